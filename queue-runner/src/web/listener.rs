//! The web listener's connections for axum: TLS streams whose handshakes are done (by the same
//! acceptor as the gRPC listener's, with the web's certificate and client certificates
//! optional), with their peer's address.

use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::StreamExt as _;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;

/// Accepted TLS connections.
pub struct TlsListener {
    accepted: Pin<Box<dyn Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send>>,
    local: SocketAddr,
}

impl TlsListener {
    /// The connections of `accepted`, a listener bound to `local`.
    pub fn new(
        accepted: impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send + 'static,
        local: SocketAddr,
    ) -> Self {
        Self {
            accepted: Box::pin(accepted),
            local,
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.accepted.next().await {
                Some(Ok(stream)) => {
                    let Ok(address) = stream.get_ref().0.peer_addr() else {
                        continue;
                    };
                    return (stream, address);
                }
                // Failed handshakes are dropped (and audited) before they get here.
                Some(Err(_)) => {}
                // The listener is gone: serve until shutdown with nothing more to accept.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
