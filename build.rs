//! Links libgcc's unwinder statically, so the binary does not load `libgcc_s.so.1`.
//!
//! Rust's standard library asks the linker for `-lgcc_s` (the unwinder behind panics and
//! backtraces) on `*-linux-gnu`. Loading that library costs every process start an extra
//! `open`/`mmap` and, worse on virtual machines, its constructor `__cpu_indicator_init`,
//! whose CPUID instructions each trap to the hypervisor: about 0.1 ms per start, which
//! `rexec` pays on every command it runs. libgcc's static unwinder (`libgcc_eh.a`) is the
//! same code; offered to the linker under the name `libgcc_s.a` in a directory searched
//! first, it is linked in instead. This is what `gcc -static-libgcc` does for C programs.
//!
//! When the compiler driver has no `libgcc_eh.a` (another toolchain, a cross build), nothing
//! changes and the binary loads `libgcc_s.so.1` as before.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DPUCTL_DYNAMIC_LIBGCC");
    let target = std::env::var("TARGET").unwrap_or_default();
    let host = std::env::var("HOST").unwrap_or_default();
    if !target.ends_with("-linux-gnu") || target != host {
        return;
    }
    if std::env::var_os("DPUCTL_DYNAMIC_LIBGCC").is_some() {
        return;
    }
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let Ok(out) = Command::new(&cc)
        .arg("-print-file-name=libgcc_eh.a")
        .output()
    else {
        return;
    };
    let found = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() || !found.is_absolute() || !found.is_file() {
        return;
    }
    let Some(out_dir) = std::env::var_os("OUT_DIR") else {
        return;
    };
    let dir = PathBuf::from(out_dir).join("static-libgcc");
    if std::fs::create_dir_all(&dir).is_err()
        || std::fs::copy(&found, dir.join("libgcc_s.a")).is_err()
    {
        println!("cargo:warning=cannot stage libgcc_eh.a; linking libgcc_s.so.1");
        return;
    }
    println!("cargo:rustc-link-search=native={}", dir.display());
}
