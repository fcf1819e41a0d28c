//! Pseudo-terminals: the server's pty master as an async byte stream, window sizes, and the
//! client's raw-mode guard.
//!
//! Concurrency: a [`PtyMaster`] is shared (`Arc`) by the session's output pump (reads), its
//! stdin writer (writes) and the frame loop (window size, foreground group); reads and writes
//! go through one `AsyncFd`, which supports concurrent readiness waits for both directions.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::termios::{self, SetArg, Termios};
use tokio::io::unix::AsyncFd;

use super::proto::Winsize;

nix::ioctl_write_ptr_bad!(ioctl_set_winsize, libc::TIOCSWINSZ, libc::winsize);
nix::ioctl_read_bad!(ioctl_get_winsize, libc::TIOCGWINSZ, libc::winsize);

/// A new pty pair sized `ws`: (master, slave).
pub fn open(ws: Winsize) -> io::Result<(OwnedFd, OwnedFd)> {
    let size = (ws.rows > 0 && ws.cols > 0).then_some(nix::pty::Winsize {
        ws_row: ws.rows,
        ws_col: ws.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    });
    let r = nix::pty::openpty(size.as_ref(), None).map_err(io::Error::from)?;
    Ok((r.master, r.slave))
}

/// Sets the window size of the terminal `fd` (the kernel sends SIGWINCH to its foreground group).
pub fn set_winsize(fd: BorrowedFd<'_>, ws: Winsize) -> io::Result<()> {
    let w = libc::winsize {
        ws_row: ws.rows,
        ws_col: ws.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the call;
    // the fd is borrowed, so it is open.
    unsafe { ioctl_set_winsize(fd.as_raw_fd(), &w) }
        .map(drop)
        .map_err(io::Error::from)
}

/// The terminal's end-of-file character (`stty eof`, ^D unless changed).
pub fn eof_char(fd: BorrowedFd<'_>) -> u8 {
    nix::sys::termios::tcgetattr(fd)
        .map(|t| t.control_chars[nix::sys::termios::SpecialCharacterIndices::VEOF as usize])
        .unwrap_or(4)
}

/// The window size of the terminal `fd`, if it is one.
pub fn get_winsize(fd: BorrowedFd<'_>) -> Option<Winsize> {
    let mut w = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` to the pointer, which is valid and exclusive
    // for the call; the fd is borrowed, so it is open.
    unsafe { ioctl_get_winsize(fd.as_raw_fd(), &mut w) }.ok()?;
    Some(Winsize {
        rows: w.ws_row,
        cols: w.ws_col,
    })
}

/// The server's end of a pty, non-blocking and registered with the reactor.
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl PtyMaster {
    /// Wraps `master` (sets O_NONBLOCK).
    pub fn new(master: OwnedFd) -> io::Result<PtyMaster> {
        let flags = nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: `master` is an OwnedFd moved into the AsyncFd, so the descriptor stays open
        // and refers to the same pty for the AsyncFd's whole life; as_raw_fd is stable.
        let fd = unsafe { AsyncFd::register(master) }.map_err(|e| e.into_parts().1)?;
        Ok(PtyMaster { fd })
    }

    /// Reads program output; `Ok(0)` once every slave is closed (Linux reports that as EIO).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `buf` (terminal input for the program).
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(io::Error::from))
            {
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// The terminal's foreground process group (where terminal signals go).
    pub fn foreground_group(&self) -> Option<nix::unistd::Pid> {
        nix::unistd::tcgetpgrp(self.fd.get_ref()).ok()
    }

    /// The master fd.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

/// Puts the client's terminal in raw mode and restores it when dropped (and when the client
/// calls [`RawMode::restore`] before exiting, since `process::exit` runs no destructors).
pub struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    /// Raw mode on stdin's terminal.
    pub fn enable() -> io::Result<RawMode> {
        let stdin = io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSADRAIN, &raw)?;
        Ok(RawMode { saved: Some(saved) })
    }

    /// Restores the saved terminal settings (once).
    pub fn restore(&mut self) {
        if let Some(t) = self.saved.take() {
            let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSADRAIN, &t);
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        self.restore();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pty_round_trip_and_winsize() {
        let (master, slave) = open(Winsize {
            rows: 30,
            cols: 100,
        })
        .unwrap();
        assert_eq!(
            get_winsize(slave.as_fd()),
            Some(Winsize {
                rows: 30,
                cols: 100
            })
        );
        let m = PtyMaster::new(master).unwrap();
        set_winsize(m.as_fd(), Winsize { rows: 5, cols: 6 }).unwrap();
        assert_eq!(
            get_winsize(slave.as_fd()),
            Some(Winsize { rows: 5, cols: 6 })
        );
        // The slave echoes input in canonical mode.
        m.write_all(b"hi\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = m.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"hi"), "{:?}", &buf[..n]);
        drop(slave);
        // Drain the rest; then EIO reads as end of file.
        let mut total = 0;
        loop {
            let n = m.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
            assert!(total < 1024);
        }
    }
}
