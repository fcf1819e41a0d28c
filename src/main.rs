//! The `dpuctl` multi-call binary: argv\[0\] basename or the first argument picks the tool.
//! All logic lives in the library; see [`dpuctl::cli`].

fn main() -> std::process::ExitCode {
    dpuctl::cli::dispatch(std::env::args_os().collect())
}
