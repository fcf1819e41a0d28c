#!/usr/bin/env bash
# Installs the system packages dpuctl's build, tests and demo need (Debian/Ubuntu, as root).
set -euo pipefail
pkgs=(fuse3 libfuse3-dev pkg-config util-linux procps tmux iproute2 libacl1-dev acl redis-server redis-tools postgresql python3 groff-base man-db)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# CPython's own file-system regression tests (test_os, test_shutil, test_sqlite3, ...) run
# against a qtfs mount in tests/qtfs_pair.rs: the system python's test package.
py=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
if [ -n "$py" ] && [ ! -d "/usr/lib/python$py/test/support" ]; then
  echo "deps: installing libpython$py-testsuite"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "libpython$py-testsuite" >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "libpython$py-testsuite" >/dev/null; } ||
    echo "deps: libpython$py-testsuite is not available; the CPython file tests will be skipped" >&2
fi
if ! command -v cargo >/dev/null; then
  echo "deps: cargo is not installed; install the Rust toolchain (https://rustup.rs) and run again" >&2
  exit 1
fi
# pjdfstest (the POSIX filesystem conformance suite, Rust edition) runs against a real qtfs
# mount in tests/qtfs_pair.rs; it is built once into cargo's bin directory.
PJD_VERSION=0.2.2
if ! command -v pjdfstest >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/pjdfstest" ]; then
  echo "deps: building pjdfstest $PJD_VERSION (cargo install, a few minutes once)"
  cargo install --quiet --locked --version "$PJD_VERSION" pjdfstest
fi
