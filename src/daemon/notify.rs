//! systemd readiness notification (`Type=notify` / `Type=notify-reload` units).
//!
//! Every function is a no-op when `NOTIFY_SOCKET` is unset (not started by systemd) and never
//! fails the daemon: a notification that cannot be delivered is logged at debug level only,
//! because the daemon works the same without it. Safe to call from any thread.

use sd_notify::NotifyState;

fn send(what: &str, states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(error) = sd_notify::notify(false, states) {
        tracing::debug!(%error, what, "cannot notify systemd");
    }
}

/// True when systemd listens for notifications (`NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The daemon is listening and serving (`READY=1`).
pub fn ready() {
    send("ready", &[NotifyState::Ready]);
}

/// The daemon is re-reading its configuration (`RELOADING=1` with the `MONOTONIC_USEC` that
/// `Type=notify-reload` requires); call [`ready`] when done.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send("reloading", &[NotifyState::Reloading, now]),
        Err(_) => send("reloading", &[NotifyState::Reloading]),
    }
}

/// The daemon is shutting down (`STOPPING=1`).
pub fn stopping() {
    send("stopping", &[NotifyState::Stopping]);
}

/// A one-line status shown by `systemctl status` (`STATUS=...`).
pub fn status(text: &str) {
    // A newline would end the STATUS= assignment and start a bogus one.
    let text = text.replace('\n', " ");
    send("status", &[NotifyState::Status(&text)]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    // The only test touching NOTIFY_SOCKET; nothing else in the crate reads it.
    #[test]
    fn notifications_reach_the_socket_and_are_no_ops_without_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        std::env::set_var("NOTIFY_SOCKET", &path);
        ready();
        status("serving 3 peers\nsecond line");
        reloading();
        stopping();
        std::env::remove_var("NOTIFY_SOCKET");
        ready(); // no socket: nothing sent, no panic

        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        for _ in 0..4 {
            let n = socket.recv(&mut buf).expect("datagram");
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert_eq!(got[0].trim_end(), "READY=1");
        assert_eq!(got[1].trim_end(), "STATUS=serving 3 peers second line");
        assert!(
            got[2].starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{:?}",
            got[2]
        );
        assert_eq!(got[3].trim_end(), "STOPPING=1");
        socket.set_nonblocking(true).expect("nonblocking");
        assert!(
            socket.recv(&mut buf).is_err(),
            "nothing sent without NOTIFY_SOCKET"
        );
    }
}
