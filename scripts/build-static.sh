#!/usr/bin/env bash
# Builds a fully static dpuctl (Rust's x86_64-unknown-linux-musl target, static-pie) and prints
# its path. The same multi-call binary as `cargo build --release`, linked against musl instead
# of the system glibc:
#
#   - it runs on any Linux of the same architecture, whatever its C library (DPU images often
#     ship another glibc than the build machine);
#   - it starts in about 0.35 ms instead of 1.2 ms on the 2-vCPU VM of docs/performance.md:
#     glibc's dynamic loader probes the CPU's caches with CPUID instructions, and each one traps
#     to the hypervisor. `rexec` starts once per command, so a static `rexec true` takes about
#     2.2 ms instead of 2.9 ms there. On bare metal the difference is much smaller.
#   - musl's allocator maps and unmaps every buffer over 128 KiB. The bulk paths reuse or
#     avoid their large buffers, and what is left costs bulk qtfs writes through a static
#     mount client or engine 5 to 10% in quick A/Bs; the other figures did not move beyond
#     noise (docs/performance.md, run 7).
#
# Usage: scripts/build-static.sh            (prints target/x86_64-unknown-linux-musl/release/dpuctl)
#        sudo "$(scripts/build-static.sh)" install
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-musl
if [ "$(uname -m)" != x86_64 ]; then
  echo "build-static: this script builds for $TARGET; on $(uname -m) use that architecture's musl target" >&2
  exit 1
fi
if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
  echo "build-static: installing the Rust standard library for $TARGET (rustup target add)" >&2
  rustup target add "$TARGET" >&2 || {
    echo "build-static: cannot install $TARGET; it needs rustup and access to its download server" >&2
    exit 1
  }
fi
cargo build --release --target "$TARGET" --bin dpuctl >&2
echo "$PWD/target/$TARGET/release/dpuctl"
