//! `qtcfg`: allowlist administration with the original tool's flags, applied live through a
//! running daemon's control socket.

use std::ffi::OsString;
use std::process::ExitCode;

/// Entry point for `qtcfg ...` and `dpuctl qtcfg ...` (`args[0]` is the program name).
pub fn main(_args: Vec<OsString>) -> ExitCode {
    todo!()
}
