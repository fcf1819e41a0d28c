#!/usr/bin/env bash
# Runs the whole test suite: unit tests, and integration tests that start real daemons on
# loopback in separate mount+pid namespaces (these need root; they say SKIPPED otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build
cargo test --all-targets -- --test-threads=2
