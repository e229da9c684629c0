#!/usr/bin/env bash
# make demo: mmd with two small real models from PyPI under a RAM budget that holds one
# of them: SmolLM2-135M-Instruct answers a question through its chat template, then
# loading Gemma 3 270M evicts it, and asking SmolLM2 again swaps them back.
set -euo pipefail
BIN=${BIN:-.venv/bin}
DEMO=${DEMO_DIR:-$PWD/.demo}
mkdir -p "$DEMO"
export MMD_SOCKET="$DEMO/run/mmd.sock"
SECONDS=0

echo "== preparing the models (the first run assembles Gemma's ~253 MB)"
{ read -r SMOL; read -r GEMMA; } < <("$BIN/python" scripts/demo_model.py "$DEMO")

# SmolLM2 is estimated at ~195 MiB and Gemma at ~347 MiB (`mmctl plan`): 400 MiB holds
# either one, never both. state_dir is fresh each run, so that no footprint learned in
# an earlier run changes those figures.
rm -rf "$DEMO/state"
cat > "$DEMO/mmd.toml" <<TOML
[daemon]
socket = "$MMD_SOCKET"
log_dir = "$DEMO/logs"
state_dir = "$DEMO/state"

[budget]
ram = "400MiB"

[models.smol]
path = "$SMOL"
role = "chat (SmolLM2-135M-Instruct, Q4_1)"
ctx = 2048

[models.gemma]
path = "$GEMMA"
role = "base model (Gemma 3 270M, Q4_K_M)"
ctx = 2048
TOML

echo "== starting mmd with [budget] ram = \"400MiB\": room for one of the two models"
"$BIN/mmd" --config "$DEMO/mmd.toml" 2> "$DEMO/mmd.log" &
MMD_PID=$!
EVENTS_PID=
stop_all() {
  [ -n "$EVENTS_PID" ] && kill "$EVENTS_PID" 2>/dev/null || true
  kill -TERM "$MMD_PID" 2>/dev/null || true
  wait "$MMD_PID" 2>/dev/null || true
}
trap stop_all EXIT
for _ in $(seq 1 200); do
  "$BIN/mmctl" health > /dev/null 2>&1 && break
  sleep 0.1
done
# The daemon's events, recorded from here on and shown at the end.
"$BIN/mmctl" events --no-memory > "$DEMO/events.txt" 2>&1 &
EVENTS_PID=$!

echo "== mmctl models"
"$BIN/mmctl" models
echo
# A 135M model wanders at the default temperature (0.8); 0.3 keeps it on topic.
echo "== mmctl infer smol \"Why is the sky blue?\" --temperature 0.3   (loads smol on demand)"
"$BIN/mmctl" infer smol "Why is the sky blue?" --max-tokens 120 --temperature 0.3
echo
echo "== mmctl load gemma   (both do not fit: mmd evicts smol, idle, to make room)"
"$BIN/mmctl" load gemma
echo
echo "== mmctl ps"
"$BIN/mmctl" ps
echo
echo "== mmctl infer smol \"Name three fruits.\" --temperature 0.3   (gemma makes way again)"
"$BIN/mmctl" infer smol "Name three fruits." --max-tokens 30 --temperature 0.3
echo
echo "== mmctl events   (what happened, as the daemon reported it)"
sleep 0.2  # the last request's event
kill "$EVENTS_PID" 2>/dev/null || true
wait "$EVENTS_PID" 2>/dev/null || true
EVENTS_PID=
grep -v ' snapshot' "$DEMO/events.txt" || true
echo
echo "== stopping mmd"
kill -TERM "$MMD_PID"
wait "$MMD_PID"
trap - EXIT
echo "== done in ${SECONDS} s (daemon log: $DEMO/mmd.log)"
