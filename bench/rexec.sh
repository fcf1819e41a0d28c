#!/usr/bin/env bash
# rexec benchmark: dpuctl rexec over TCP (PSK handshake) and over the Unix socket, side by side
# with local fork+exec and ssh (fresh and ControlMaster) in ONE interleaved run of
# ../shared/bench/run_all.sh exec (hyperfine `PREFIX true`, 1 GiB stdout, 1 GiB stdin), plus
# 100 concurrent `rexec true`. Prints the summary table with ratios against `local`.
#
#   bench/rexec.sh               REPS=3 by default; REPS=1 RUNS=20 for a quick look
#   SHARED=/path/to/shared/bench bench/rexec.sh
#
# Targets: local, ssh, ssh-mux (from run_all.sh), rexec-tcp, rexec-uds (the server's Unix socket),
# rexec-udsproxyd (that socket reached through udsproxyd and the engine, as from a DPU), and
# rexec-static-tcp / rexec-static-udsproxyd: the same with the static (musl) client. The
# daemons run with --log-level warn and a fresh key; everything stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source bench/lib.sh
SHARED=${SHARED:-$ROOT/../shared/bench}
[ -x "$SHARED/run_all.sh" ] || { echo "bench: $SHARED/run_all.sh not found; set SHARED=" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
need=()
for p in hyperfine openssh-server openssh-client jq python3; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; fi
export ANCHOR_DIR=${ANCHOR_DIR:-/tmp/dpuctl-bench}
export RESULTS=${RESULTS:-$ANCHOR_DIR/results.jsonl}
mkdir -p "$ANCHOR_DIR"
cargo build --release -q --bins
BIN=$ROOT/target/release/dpuctl
# The static (musl) build of the same binary, as a second client: it starts without glibc's
# dynamic loader (scripts/build-static.sh says why that matters). Skipped, loudly, when the
# musl target cannot be installed; STATIC=0 skips it on purpose.
STATIC_BIN=
if [ "${STATIC:-1}" != 0 ]; then
  STATIC_BIN=$(scripts/build-static.sh 2>"$ANCHOR_DIR/build-static.log") || {
    echo "bench: no static build (see $ANCHOR_DIR/build-static.log); the rexec-static targets are skipped" >&2
    STATIC_BIN=
  }
fi

WORK=$(mktemp -d /tmp/dpuctl-rexec-bench.XXXXXX)
SERVER_PID= ENGINE_PID= PROXY_PID=
cleanup() {
  for p in $PROXY_PID $ENGINE_PID $SERVER_PID; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" keygen "$WORK/psk" >/dev/null
ln -s "$BIN" "$WORK/rexec"
PORT=$(free_port)
export REXEC_RUN_DIR=$WORK/rexec-run
"$BIN" rexec_server --listen "tcp://127.0.0.1:$PORT" --uds --key "$WORK/psk" \
  --no-whitelist --run-dir "$WORK/run" --log-level warn 2>"$WORK/server.log" &
SERVER_PID=$!
for _ in $(seq 100); do [ -S "$REXEC_RUN_DIR/rexec_uds.sock" ] && break; sleep 0.05; done

# Over udsproxyd, as on a DPU: the engine (HOST, built-in peer) runs in a private mount
# namespace whose $VIEW holds the server's socket; outside it $VIEW is empty, so the client's
# connect fails locally (ENOENT) and goes through the local udsproxyd, over TCP 127.0.0.1, to
# the engine, which connects to rexec_server.
VIEW=/run/dpuctl-rexec-host
start_uds_pair 'ln -s "$REXEC_RUN_DIR/rexec_uds.sock" "$1/rexec_uds.sock"'
export UDSPROXY_REQUEST_SOCKET=$WORK/dpu-run/remote_uds.sock

TCP="$WORK/rexec --server tcp://127.0.0.1:$PORT --key $WORK/psk --"
UDS="$WORK/rexec --"
PROXIED="$WORK/rexec --server unix://$VIEW/rexec_uds.sock --"
$PROXIED true || { cat "$WORK"/*.log >&2; echo "bench: rexec through udsproxyd failed" >&2; exit 1; }
EXTRA_EXEC="rexec-tcp=$TCP;rexec-uds=$UDS;rexec-udsproxyd=$PROXIED"
if [ -n "$STATIC_BIN" ]; then
  mkdir -p "$WORK/static"
  ln -s "$STATIC_BIN" "$WORK/static/rexec"
  STATIC_TCP="$WORK/static/rexec --server tcp://127.0.0.1:$PORT --key $WORK/psk --"
  STATIC_PROXIED="$WORK/static/rexec --server unix://$VIEW/rexec_uds.sock --"
  $STATIC_PROXIED true || { echo "bench: the static rexec through udsproxyd failed" >&2; exit 1; }
  EXTRA_EXEC="$EXTRA_EXEC;rexec-static-tcp=$STATIC_TCP;rexec-static-udsproxyd=$STATIC_PROXIED"
fi

echo "== 100 concurrent rexec true (tcp, uds, udsproxyd)" >&2
for prefix in "$TCP" "$UDS" "$PROXIED"; do
  fails=0
  pids=()
  for _ in $(seq 100); do $prefix true & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || fails=$((fails + 1)); done
  echo "   ${prefix#$WORK/} : $fails of 100 failed" >&2
  [ "$fails" = 0 ] || { echo "bench: concurrent sessions failed" >&2; exit 1; }
done

EXTRA_EXEC="$EXTRA_EXEC" "$SHARED/run_all.sh" exec
echo
python3 "$SHARED/summarize.py" "$RESULTS" --bench exec --base local
