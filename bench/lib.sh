# Shared by the bench scripts (sourced, not run).

# A free TCP port on 127.0.0.1 below the kernel's ephemeral range, so that no outgoing
# connection takes it as a source port before the daemon it is meant for binds it.
free_port() {
  python3 - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for port in random.sample(range(10000, max(low, 11000)), 200):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    break
else:
    raise SystemExit("no free port on 127.0.0.1")
PY
}

# start_uds_pair SETUP — a HOST and a DPU on one box, linked by udsproxyd:
#  - the HOST: the engine (its udsproxyd peer built in) in a private mount namespace whose $VIEW
#    is a fresh tmpfs; SETUP is sh code run there first, with $VIEW as "$1" (e.g. symlinks to
#    the real servers' sockets, from exported variables);
#  - the DPU: udsproxyd dialling the engine. Outside the namespace $VIEW stays empty, so a
#    local connect there fails (ENOENT) and goes through udsproxyd to the HOST.
# Both allow udsconnect to $VIEW only. Needs BIN, WORK (holding psk) and VIEW; sets ENGINE_PID
# and PROXY_PID (the caller's cleanup kills them); returns non-zero, with the daemons' logs on
# stderr, if they do not link within 10 s.
start_uds_pair() {
  local setup=$1 uds_port
  printf '[Mount]\nPath=/nonexistent\n[Udsconnect]\nPath=%s\n' "$VIEW" > "$WORK/host-whitelist"
  printf '[Udsconnect]\nPath=%s\n' "$VIEW" > "$WORK/dpu-whitelist"
  mkdir -p "$VIEW"
  uds_port=$(free_port)
  unshare --mount --propagation private sh -c \
    "mount -t tmpfs -o mode=0755 tmpfs \"\$1\" && $setup && shift && exec \"\$@\"" sh "$VIEW" \
    "$BIN" engine --listen "tcp://127.0.0.1:$(free_port)" --uds-listen "tcp://127.0.0.1:$uds_port" \
    --key "$WORK/psk" --whitelist "$WORK/host-whitelist" --run-dir "$WORK/host-run" \
    --log-level warn 2>"$WORK/engine.log" &
  ENGINE_PID=$!
  "$BIN" udsproxyd --listen "" --peer "tcp://127.0.0.1:$uds_port" --key "$WORK/psk" \
    --whitelist "$WORK/dpu-whitelist" --run-dir "$WORK/dpu-run" --log-level warn 2>"$WORK/udsproxyd.log" &
  PROXY_PID=$!
  for _ in $(seq 100); do
    "$BIN" status --json --run-dir "$WORK/dpu-run" 2>/dev/null | grep -q '"connected"' && return 0
    sleep 0.1
  done
  cat "$WORK/engine.log" "$WORK/udsproxyd.log" >&2
  echo "bench: the engine and udsproxyd did not link" >&2
  return 1
}
