//! The terminal guard: raw mode and the alternate screen while the dashboard runs, and the
//! terminal given back on every way out — normal exit and errors (via `Drop`), panics (via a
//! panic hook that restores before the message is printed), and signals (the UI loop turns
//! SIGTERM/SIGHUP into a normal exit, so `Drop` runs).
//!
//! Concurrency: used from the UI loop's thread only; [`restore`] acts once per takeover, so
//! the panic hook and `Drop` may both run it.

use std::io::{self, IsTerminal, Stdout};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use crossterm::cursor::{Hide, Show};
use crossterm::execute;
use crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;

/// Why the terminal could not be taken over.
#[derive(Debug, thiserror::Error)]
pub enum TermError {
    #[error("dpuctl tui needs a terminal on stdin and stdout; for scripts use `dpuctl status --json` and `dpuctl logs -f`")]
    NotATerminal,
    #[error("cannot switch the terminal to raw mode: {0}")]
    RawMode(#[source] io::Error),
    #[error("cannot set up the screen: {0}")]
    Screen(#[source] io::Error),
}

/// Owns the terminal while the dashboard runs; gives it back when dropped.
pub struct TerminalGuard {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl TerminalGuard {
    /// Enters raw mode and the alternate screen, and installs the panic hook.
    pub fn enter() -> Result<TerminalGuard, TermError> {
        if !io::stdout().is_terminal() || !io::stdin().is_terminal() {
            return Err(TermError::NotATerminal);
        }
        install_panic_hook();
        enable_raw_mode().map_err(TermError::RawMode)?;
        TAKEN.store(true, Ordering::SeqCst);
        let setup = execute!(io::stdout(), EnterAlternateScreen, Hide)
            .and_then(|_| Terminal::new(CrosstermBackend::new(io::stdout())));
        match setup {
            Ok(terminal) => Ok(TerminalGuard { terminal }),
            Err(e) => {
                restore();
                Err(TermError::Screen(e))
            }
        }
    }

    /// The terminal to draw on.
    pub fn terminal(&mut self) -> &mut Terminal<CrosstermBackend<Stdout>> {
        &mut self.terminal
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Whether the terminal is taken over (raw mode and the alternate screen).
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Leaves raw mode and the alternate screen and shows the cursor; harmless when not entered,
/// and done once: a second "leave the alternate screen" would move the cursor back to where
/// it was on entry, so the next output (the shell prompt) would overwrite a panic message.
pub fn restore() {
    if TAKEN.swap(false, Ordering::SeqCst) {
        let _ = disable_raw_mode();
        let _ = execute!(io::stdout(), LeaveAlternateScreen, Show);
    }
}

/// Chains a hook that restores the terminal before the previous hook prints the panic, so
/// the message is readable and the shell usable.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}
