//! Process signals of a daemon: SIGTERM and SIGINT request a graceful shutdown, SIGHUP
//! requests a reload.
//!
//! Concurrency: [`spawn`] registers the handlers before it returns (so a signal arriving right
//! after cannot take the default, fatal action) and then runs one task that owns them. The
//! first SIGTERM/SIGINT cancels the shutdown token; one arriving once the token is already
//! cancelled — the operator pressing Ctrl-C twice, or systemd insisting — exits the process
//! at once with the shell's code for that signal (130 for SIGINT, 143 for SIGTERM). SIGHUPs
//! go into a channel of capacity one, so a burst while a reload is running becomes exactly one
//! more reload and the signal task never waits for the daemon.

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Exit code after a second SIGINT (128 + 2).
pub const EXIT_SIGINT: i32 = 130;
/// Exit code after a second SIGTERM (128 + 15).
pub const EXIT_SIGTERM: i32 = 143;

fn register(kind: SignalKind, name: &str) -> Option<Signal> {
    match signal(kind) {
        Ok(stream) => Some(stream),
        Err(error) => {
            // Only fails when the runtime has no signal driver or the OS refuses; the daemon
            // still runs, it just cannot be stopped or reloaded by that signal.
            tracing::error!(%error, signal = name, "cannot install a signal handler");
            None
        }
    }
}

async fn recv(stream: &mut Option<Signal>) {
    match stream {
        Some(stream) => {
            if stream.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// Installs the handlers and returns the reload channel: one `()` per SIGHUP, coalesced
/// while the receiver is behind. Must be called inside a tokio runtime.
pub fn spawn(shutdown: CancellationToken) -> mpsc::Receiver<()> {
    let mut term = register(SignalKind::terminate(), "SIGTERM");
    let mut int = register(SignalKind::interrupt(), "SIGINT");
    let mut hup = register(SignalKind::hangup(), "SIGHUP");
    let (reload_tx, reload_rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let (name, code) = tokio::select! {
                _ = recv(&mut term) => ("SIGTERM", EXIT_SIGTERM),
                _ = recv(&mut int) => ("SIGINT", EXIT_SIGINT),
                _ = recv(&mut hup) => {
                    // Full means a reload is already pending: this one is folded into it.
                    // Closed means the daemon does not reload: nothing to do either.
                    match reload_tx.try_send(()) {
                        Ok(()) => tracing::info!("SIGHUP: reload requested"),
                        Err(mpsc::error::TrySendError::Full(())) => {
                            tracing::debug!("SIGHUP: a reload is already pending")
                        }
                        Err(mpsc::error::TrySendError::Closed(())) => {
                            tracing::warn!("SIGHUP ignored: this daemon does not reload")
                        }
                    }
                    continue;
                }
            };
            if shutdown.is_cancelled() {
                tracing::warn!(signal = name, "second stop signal: exiting now");
                std::process::exit(code);
            }
            tracing::info!(
                signal = name,
                "shutting down (send it again to exit at once)"
            );
            shutdown.cancel();
        }
    });
    reload_rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::{raise, Signal as NixSignal};
    use std::time::Duration;

    // The only test of the library that raises signals: a second SIGTERM would end the test
    // process, so nothing else may install these handlers and cancel concurrently.
    #[tokio::test]
    async fn sighup_requests_coalesced_reloads_and_sigterm_cancels() {
        let shutdown = CancellationToken::new();
        let mut reloads = spawn(shutdown.clone());

        raise(NixSignal::SIGHUP).expect("raise SIGHUP");
        tokio::time::timeout(Duration::from_secs(5), reloads.recv())
            .await
            .expect("reload within 5 s")
            .expect("channel open");

        // A burst while nobody reads becomes one pending reload.
        for _ in 0..3 {
            raise(NixSignal::SIGHUP).expect("raise SIGHUP");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::timeout(Duration::from_secs(5), reloads.recv())
            .await
            .expect("coalesced reload")
            .expect("channel open");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            reloads.try_recv().is_err(),
            "the burst was coalesced into one"
        );
        assert!(!shutdown.is_cancelled());

        raise(NixSignal::SIGTERM).expect("raise SIGTERM");
        tokio::time::timeout(Duration::from_secs(5), shutdown.cancelled())
            .await
            .expect("SIGTERM cancels the token");
    }
}
