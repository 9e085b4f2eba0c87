//! systemd's notification protocol (`sd_notify`): `READY=1`, `STATUS=…`, `WATCHDOG=1` and
//! `STOPPING=1` as datagrams to the socket systemd names in `NOTIFY_SOCKET` (a path, or an
//! abstract name after `@`). Without that variable, as outside systemd, every call does nothing.
//! Failures are logged once and otherwise ignored: a daemon must not stop because its supervisor
//! cannot hear it.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Where notifications go.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    watchdog: Option<Duration>,
    complained: AtomicBool,
}

impl Notifier {
    /// The notifier systemd's environment describes: `NOTIFY_SOCKET`, and `WATCHDOG_USEC` (when
    /// `WATCHDOG_PID` is unset or names this process).
    #[must_use]
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|name| {
            let address = address(name.to_str()?).ok()?;
            Some((UnixDatagram::unbound().ok()?, address))
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|pid| pid.parse() == Ok(std::process::id()));
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|usec| for_us && *usec > 0)
            .map(Duration::from_micros);
        Self {
            socket,
            watchdog,
            complained: AtomicBool::new(false),
        }
    }

    /// A notifier that sends nothing, whatever the environment says (for tests).
    #[must_use]
    pub fn disabled() -> Self {
        Self {
            socket: None,
            watchdog: None,
            complained: AtomicBool::new(false),
        }
    }

    /// How often to send `WATCHDOG=1`: half the watchdog timeout, if systemd set one.
    #[must_use]
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }

    /// The daemon is ready.
    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// A one-line status for `systemctl status`.
    pub fn status(&self, line: &str) {
        self.send(&format!("STATUS={}", line.replace('\n', " ")));
    }

    /// The daemon's main loop is alive.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// The daemon is shutting down.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    fn send(&self, message: &str) {
        let Some((socket, address)) = &self.socket else {
            return;
        };
        if let Err(error) = socket.send_to_addr(message.as_bytes(), address)
            && !self.complained.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(%error, "cannot notify systemd (NOTIFY_SOCKET)");
        }
    }
}

/// The socket address `NOTIFY_SOCKET` names.
fn address(name: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt as _;
    match name.strip_prefix('@') {
        Some(abstract_name) => {
            std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
        }
        None => std::os::unix::net::SocketAddr::from_pathname(name),
    }
}
