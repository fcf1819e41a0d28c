#!/usr/bin/env bash
# The main job: a HOST and a DPU on one machine. The HOST side runs `engine`, the DPU side runs
# `udsproxyd`, each in its own mount+pid namespace with its own /run, talking over 127.0.0.1
# with a freshly generated key. Shows both sides' status, changes an allowlist live with
# qtcfg, then follows the logs until Ctrl-C (or exits at once with --once). Tears it all down.
set -euo pipefail
cd "$(dirname "$0")/.."
once=0
[ "${1:-}" = "--once" ] && once=1
if [ "$(id -u)" != 0 ]; then echo "demo: run as root (it creates mount and pid namespaces)" >&2; exit 1; fi
scripts/deps.sh
echo "demo: building dpuctl (release)"
cargo build --release --bins -q
BIN=$PWD/target/release/dpuctl
WORK=$(mktemp -d /tmp/dpuctl-demo.XXXXXX)
pids=()
cleanup() {
  # unshare's parent ignores SIGTERM while it waits: signal the daemon it forked.
  for p in "${pids[@]}"; do
    for c in $(cat "/proc/$p/task/$p/children" 2>/dev/null); do kill -TERM "$c" 2>/dev/null || true; done
    kill -TERM "$p" 2>/dev/null || true
  done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HOST_UDS=$(free_port); DPU_UDS=$(free_port); FS=$(free_port)

"$BIN" keygen "$WORK/psk" >/dev/null
mkdir -p "$WORK/export"
cat > "$WORK/whitelist" <<WL
[Mount]
Path=$WORK/export
[Udsconnect]
Path=/var/run/docker.sock
WL

# side NAME LOG CMD...: runs CMD as pid 1 of new mount+pid namespaces with a private /run.
side() {
  local log=$1; shift
  unshare --mount --pid --fork --mount-proc --propagation private --kill-child=SIGTERM \
    bash -c 'mount -t tmpfs -o mode=0755 tmpfs /run && exec "$@"' side "$@" >"$log" 2>&1 &
  pids+=($!)
}
# in PID CMD...: runs CMD in the mount namespace of the side whose unshare pid is PID.
in_side() {
  local up=$1; shift
  local child; child=$(cat "/proc/$up/task/$up/children" | awk '{print $1}')
  nsenter --target "$child" --mount "$@"
}

echo "demo: HOST engine on 127.0.0.1:$FS (files) and :$HOST_UDS (udsproxyd peer)"
side "$WORK/host.log" "$BIN" engine 2 1 127.0.0.1 "$HOST_UDS" 127.0.0.1 "$DPU_UDS" \
  --listen "tcp://127.0.0.1:$FS" --key "$WORK/psk" --whitelist "$WORK/whitelist"
HOST=${pids[-1]}
echo "demo: DPU udsproxyd on 127.0.0.1:$DPU_UDS, peer 127.0.0.1:$HOST_UDS"
side "$WORK/dpu.log" "$BIN" udsproxyd 1 127.0.0.1 "$DPU_UDS" 127.0.0.1 "$HOST_UDS" \
  --key "$WORK/psk" --whitelist "$WORK/whitelist"
DPU=${pids[-1]}

for _ in $(seq 1 100); do
  if in_side "$DPU" "$BIN" status --json 2>/dev/null | grep -Eq '"state": *"connected"'; then break; fi
  sleep 0.1
done
echo; echo "===== HOST: dpuctl status"; in_side "$HOST" "$BIN" status || true
echo; echo "===== DPU: dpuctl status"; in_side "$DPU" "$BIN" status || true
echo; echo "===== DPU: qtcfg -w udsconnect -x /var/run/test, then qtcfg -z udsconnect"
in_side "$DPU" "$BIN" qtcfg -w udsconnect -x /var/run/test
in_side "$DPU" "$BIN" qtcfg -z udsconnect
echo; echo "===== DPU: dpuctl status --json"; in_side "$DPU" "$BIN" status --json
if ! in_side "$DPU" "$BIN" status --json | grep -Eq '"state": *"connected"'; then
  echo "demo: the peers did not connect; logs:" >&2; cat "$WORK/host.log" "$WORK/dpu.log" >&2; exit 1
fi
if [ "$once" = 1 ]; then echo; echo "demo: ok"; exit 0; fi
echo; echo "===== following both sides' logs (Ctrl-C stops and cleans up)"
in_side "$HOST" "$BIN" logs -f &
pids+=($!)
in_side "$DPU" "$BIN" logs -f
