//! Test helper for `tests/tui_e2e.rs`: takes the terminal over exactly as `dpuctl tui` does
//! (raw mode, alternate screen, the panic hook), draws one frame, then panics. The guard is
//! leaked first, so only the panic hook can give the terminal back — which is what the test
//! checks from the tmux pane afterwards.

use std::time::Duration;

fn main() {
    let mut guard = match dpuctl::tui::term::TerminalGuard::enter() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("tui_panic: {e}");
            std::process::exit(2);
        }
    };
    let drawn = guard.terminal().draw(|f| {
        f.render_widget(
            ratatui::widgets::Paragraph::new("TUI-PANIC-DRAWN: panicking in a moment"),
            f.area(),
        )
    });
    if let Err(e) = drawn {
        eprintln!("tui_panic: cannot draw: {e}");
        std::process::exit(2);
    }
    std::thread::sleep(Duration::from_millis(500));
    std::mem::forget(guard);
    panic!("deliberate panic to test the terminal restore");
}
