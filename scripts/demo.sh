#!/usr/bin/env bash
# The main job, on a fresh machine: installs the system packages, builds dpuctl (release) and
# runs `dpuctl demo` — a HOST and a DPU in separate namespaces on this machine, with live
# traffic, opened in the dashboard. Arguments go to `dpuctl demo` (see `dpuctl demo --help`:
# --no-tui, --duration 10s, --keep-dir, --no-color). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "demo: run as root (it creates mount and pid namespaces and a FUSE mount)" >&2; exit 1; fi
scripts/deps.sh
echo "demo: building dpuctl (release)"
cargo build --release --bins -q
exec target/release/dpuctl demo "$@"
