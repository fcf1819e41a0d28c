#!/usr/bin/env bash
# qtfs benchmark: dpuctl side by side with a local dir, bindfs and sshfs in ONE interleaved run
# of ../shared/bench/run_all.sh fs (fio 1 GiB seq/rand, the Python metadata loop, tar of the
# Python stdlib), all on 127.0.0.1. Prints the summary table with ratios against `local`.
#
#   bench/fs.sh                  REPS=3 by default; REPS=1 for a quick look
#   SHARED=/path/to/shared/bench bench/fs.sh
#
# dpuctl targets: `dpuctl` (default options) and `dpuctl-wb` (-o writeback), both mounting the
# same $ANCHOR_DIR/local the peers use, through an engine with a fresh key.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source bench/lib.sh
SHARED=${SHARED:-$ROOT/../shared/bench}
[ -x "$SHARED/run_all.sh" ] || { echo "bench: $SHARED/run_all.sh not found; set SHARED=" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "bench: run as root (FUSE mounts, drop_caches)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
need=()
for p in fio bindfs sshfs openssh-server openssh-client hyperfine python3; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; fi
scripts/deps.sh
cargo build --release -q --bins
BIN=$ROOT/target/release/dpuctl

export ANCHOR_DIR=${ANCHOR_DIR:-/tmp/dpuctl-bench}
export RESULTS=${RESULTS:-$ANCHOR_DIR/results.jsonl}
mkdir -p "$ANCHOR_DIR/local" "$ANCHOR_DIR/mnt/dpuctl" "$ANCHOR_DIR/mnt/dpuctl-wb"
# The tar test's tree: the Python stdlib as fsbench.sh would pack it, minus dangling symlinks
# (some distributions ship them, e.g. to a -dev package's files); sshfs cannot utime or chown
# through them, which would abort the whole run.
export TREE_TAR=${TREE_TAR:-$ANCHOR_DIR/pystdlib.tar}
if [ ! -s "$TREE_TAR" ]; then
  src=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
  (cd "$(dirname "$src")" && find "$(basename "$src")" -path '*/site-packages' -prune -o ! -xtype l -print |
    tar --no-recursion -cf "$TREE_TAR" -T -)
fi
WORK=$(mktemp -d /tmp/dpuctl-bench-run.XXXXXX)
ENGINE_PID=
cleanup() {
  umount "$ANCHOR_DIR/mnt/dpuctl" 2>/dev/null || true
  umount "$ANCHOR_DIR/mnt/dpuctl-wb" 2>/dev/null || true
  [ -n "$ENGINE_PID" ] && kill "$ENGINE_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" keygen "$WORK/psk" >/dev/null
printf '[Mount]\nPath=%s\n' "$ANCHOR_DIR/local" > "$WORK/whitelist"
PORT=$(free_port)
"$BIN" engine --no-uds --listen "tcp://127.0.0.1:$PORT" --threads 16 --key "$WORK/psk" \
  --whitelist "$WORK/whitelist" --run-dir "$WORK/run" --log-level warn 2>"$WORK/engine.log" &
ENGINE_PID=$!
for _ in $(seq 100); do "$BIN" status --run-dir "$WORK/run" >/dev/null 2>&1 && break; sleep 0.05; done
opts="server=127.0.0.1:$PORT,key=$WORK/psk"
"$BIN" mount "$ANCHOR_DIR/local" "$ANCHOR_DIR/mnt/dpuctl" -o "$opts"
"$BIN" mount "$ANCHOR_DIR/local" "$ANCHOR_DIR/mnt/dpuctl-wb" -o "$opts,writeback"

EXTRA_FS="dpuctl=$ANCHOR_DIR/mnt/dpuctl dpuctl-wb=$ANCHOR_DIR/mnt/dpuctl-wb" "$SHARED/run_all.sh" fs
echo
python3 "$SHARED/summarize.py" "$RESULTS" --bench fs --base local
