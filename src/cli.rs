//! argv[0] / subcommand dispatch.

use std::ffi::OsString;
use std::process::ExitCode;

/// Runs the tool named by argv[0]'s basename or, for `dpuctl`, by the first argument.
pub fn dispatch(_args: Vec<OsString>) -> ExitCode {
    ExitCode::SUCCESS
}
