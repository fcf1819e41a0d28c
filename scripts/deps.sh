#!/usr/bin/env bash
# Installs the system packages dpuctl's build, tests and demo need (Debian/Ubuntu, as root).
set -euo pipefail
pkgs=(fuse3 libfuse3-dev pkg-config util-linux procps tmux iproute2)
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
if ! command -v cargo >/dev/null; then
  echo "deps: cargo is not installed; install the Rust toolchain (https://rustup.rs) and run again" >&2
  exit 1
fi
