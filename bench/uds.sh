#!/usr/bin/env bash
# udsproxyd benchmark: redis-benchmark and streambench through udsproxyd (DPU side) -> engine
# (HOST side, built-in peer) side by side with `direct` and the socat chain in ONE interleaved
# run of ../shared/bench/run_all.sh uds (and pg when asked), all on 127.0.0.1.
#
#   bench/uds.sh              sections: uds (redis -P 1/16, stream push/pull, connrate, rtt)
#   bench/uds.sh uds pg       also pgbench through the proxy
#   REPS=1 bench/uds.sh       a quick look (default REPS=3)
#   SHARED=/path/to/shared/bench bench/uds.sh
#
# How the "two machines" are made on one box: the engine runs in a private mount namespace in
# which /run/dpuctl-host holds symlinks to the real servers' sockets ($ANCHOR_DIR/redis.sock,
# sink.sock, pgsock/.s.PGSQL.5432). Outside that namespace /run/dpuctl-host is empty, so a
# client's connect to /run/dpuctl-host/redis.sock fails locally (ENOENT); with
# LD_PRELOAD=libudsproxy.so it is retried through udsproxyd, which proxies it over TCP
# 127.0.0.1 to the engine, which connects to the real server. The benchmark clients are the
# shared scripts' own (redis-benchmark, streambench.py, pgbench), unmodified, with the shim
# preloaded for the whole run: the direct and socat targets' connects succeed locally, so the
# shim only passes them through.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source bench/lib.sh
SHARED=${SHARED:-$ROOT/../shared/bench}
[ -x "$SHARED/run_all.sh" ] || SHARED=$ROOT/../../shared/bench   # from a worktree
[ -x "$SHARED/run_all.sh" ] || { echo "bench: $SHARED/run_all.sh not found; set SHARED=" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "bench: run as root (mount namespace for the HOST side)" >&2; exit 1; }
SECTIONS=${*:-uds}
export DEBIAN_FRONTEND=noninteractive
need=()
for p in redis-server redis-tools socat jq python3; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [[ " $SECTIONS " == *" pg "* ]]; then
  for p in postgresql postgresql-contrib; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
  done
fi
if [ "${#need[@]}" -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; fi
cargo build --release -q
BIN=$ROOT/target/release/dpuctl
SHIM=$ROOT/target/release/libudsproxy.so
[ -f "$SHIM" ] || { echo "bench: $SHIM missing (cargo build --release builds it)" >&2; exit 1; }

export ANCHOR_DIR=${ANCHOR_DIR:-/tmp/dpuctl-bench}
export RESULTS=${RESULTS:-$ANCHOR_DIR/results.jsonl}
mkdir -p "$ANCHOR_DIR"
WORK=$(mktemp -d /tmp/dpuctl-udsbench.XXXXXX)
VIEW=/run/dpuctl-host
ENGINE_PID= PROXY_PID=
cleanup() {
  [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null || true
  [ -n "$ENGINE_PID" ] && kill "$ENGINE_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" keygen "$WORK/psk" >/dev/null
# The HOST side's $VIEW holds links to the real sockets.
start_uds_pair 'mkdir -p "$1/pg" && ln -s "$ANCHOR_DIR/redis.sock" "$1/redis.sock" &&
  ln -s "$ANCHOR_DIR/sink.sock" "$1/sink.sock" && ln -s "$ANCHOR_DIR/pgsock/.s.PGSQL.5432" "$1/pg/.s.PGSQL.5432"'

export LD_PRELOAD=$SHIM UDSPROXY_REQUEST_SOCKET=$WORK/dpu-run/remote_uds.sock
RUN_START=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)
EXTRA_REDIS="dpuctl=$VIEW/redis.sock" EXTRA_STREAM="dpuctl=$VIEW/sink.sock" EXTRA_PG="dpuctl=$VIEW/pg" \
  "$SHARED/run_all.sh" $SECTIONS
unset LD_PRELOAD
# The summary table has throughput only; the latency each sample carried (redis-benchmark's
# p50/p99 per request, the 64-byte round trip's p99) is printed here, medians over the reps.
echo
echo "## latency of this run, p50 / p99 (median over reps)"
python3 - "$RESULTS" "$RUN_START" <<'PY'
import json, statistics, sys
rows = []
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r.get("bench") == "uds" and r.get("ts", "") >= sys.argv[2]:
        rows.append(r)
cells, targets, metrics = {}, [], []
for r in rows:
    t, m = r["target"], r["metric"]
    if "p99_ms" in r:
        pair = (float(r["p50_ms"]) * 1000, float(r["p99_ms"]) * 1000)
    elif "p99_us" in r:
        pair = (float(r["value"]), float(r["p99_us"]))
    else:
        continue
    cells.setdefault((m, t), []).append(pair)
    targets += [t] if t not in targets else []
    metrics += [m] if m not in metrics else []
print("| metric | " + " | ".join(f"{t} p50/p99 µs" for t in targets) + " |")
print("|---|" + "---|" * len(targets))
for m in metrics:
    out = []
    for t in targets:
        v = cells.get((m, t))
        out.append("-" if not v else "%.0f / %.0f" % (statistics.median(p for p, _ in v), statistics.median(q for _, q in v)))
    print(f"| {m} | " + " | ".join(out) + " |")
PY
echo
echo "## udsproxyd counters after the run"
"$BIN" status --json --run-dir "$WORK/dpu-run" | jq -c '.daemons[0].counters'
