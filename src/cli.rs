//! argv[0] / subcommand dispatch.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

/// Runs the tool named by argv[0]'s basename or, for `dpuctl`, by the first argument.
pub fn dispatch(args: Vec<OsString>) -> ExitCode {
    // Minimal routing for `qtcfg` so its CLI tests can run; the full dispatcher replaces this.
    let argv0_is_qtcfg = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == "qtcfg");
    if argv0_is_qtcfg {
        return crate::allowlist::qtcfg::main(args);
    }
    if args.get(1).is_some_and(|a| a == "qtcfg") {
        return crate::allowlist::qtcfg::main(args.into_iter().skip(1).collect());
    }
    ExitCode::SUCCESS
}
