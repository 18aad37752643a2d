//! Readiness notification for systemd (`Type=notify`): when `NOTIFY_SOCKET` is set, the
//! relay sends `READY=1` once it serves and `STOPPING=1` when it starts to shut down.
//! A datagram to a Unix socket, written by hand because it is five lines.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. "READY=1") to the service manager, if there is one. Failures are
/// logged, never fatal: a relay outside systemd has no socket to tell.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = notify_to(&path, state) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Sends `state` to the socket at `path` (`@name` for an abstract socket).
fn notify_to(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    if let Some(name) = path.as_encoded_bytes().strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_reaches_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
