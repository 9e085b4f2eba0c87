//! A loopback TCP proxy whose connections a test can cut, as a network blip would: it forwards
//! every connection to a target, and [`TcpProxy::cut`] closes the ones open at that moment
//! while new ones keep being accepted.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A running proxy; dropping it stops it and closes its connections.
pub struct TcpProxy {
    port: u16,
    /// Bumped by every cut; each connection ends when it changes.
    generation: watch::Sender<u64>,
    _tasks: JoinSet<()>,
}

impl TcpProxy {
    /// Starts forwarding a free port on 127.0.0.1 to `target`.
    ///
    /// # Panics
    /// If no port can be bound.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap_or_else(|error| panic!("binding the proxy: {error}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|error| panic!("the proxy's address: {error}"))
            .port();
        let (generation, _) = watch::channel(0);
        let mut tasks = JoinSet::new();
        let cuts = generation.clone();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                connections.spawn(forward(client, target, cuts.subscribe()));
            }
        });
        Self {
            port,
            generation,
            _tasks: tasks,
        }
    }

    /// The port clients dial instead of the target's.
    #[must_use]
    pub const fn port(&self) -> u16 {
        self.port
    }

    /// Closes every connection open now; later ones are forwarded again.
    pub fn cut(&self) {
        self.generation.send_modify(|generation| *generation += 1);
    }
}

/// Forwards one connection until either side closes it or the proxy cuts it.
async fn forward(mut client: TcpStream, target: SocketAddr, mut cut: watch::Receiver<u64>) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    cut.borrow_and_update();
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = cut.changed() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn a_cut_closes_open_connections_and_new_ones_still_pass() {
        let echo = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let target = echo.local_addr().unwrap();
        let mut servers = JoinSet::new();
        servers.spawn(async move {
            let mut open = JoinSet::new();
            while let Ok((mut stream, _)) = echo.accept().await {
                open.spawn(async move {
                    let (mut reader, mut writer) = stream.split();
                    let _ = tokio::io::copy(&mut reader, &mut writer).await;
                });
            }
        });
        let proxy = TcpProxy::start(target).await;
        let mut first = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        first.write_all(b"ping").await.unwrap();
        let mut answer = [0u8; 4];
        first.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"ping");

        proxy.cut();
        let mut rest = Vec::new();
        let read = first.read_to_end(&mut rest).await;
        assert!(
            read.is_err() || rest.is_empty(),
            "the cut connection ends: {read:?}"
        );
        let mut second = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        second.write_all(b"pong").await.unwrap();
        second.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"pong");
    }
}
