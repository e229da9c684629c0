#!/usr/bin/env bash
# On a lent GPU machine, from the project root (carried there with .device/ by the device
# tool): install the carried wheels and Vulkan loader over the machine's Python, install mmd,
# unpack the llama-server builds, then run COMMAND, or by default the plan below. Everything
# it writes goes to $OUT; summary.txt says what ran, its exit status and how long it took.
#
#   bash .device/run.sh [--dry-run] [COMMAND...]
#
# The plan runs, with each build (cuda: the carried `make llama BACKEND=cuda` build; vulkan:
# the bundled one), the GPU tests (gpu-tests-B.txt), figures.py (figures-B.txt: load time,
# tokens/s, host and GPU memory per placement, threads, buffer lines per device),
# bench/run.py --quick (bench-B.txt, bench-B.json) and the whole suite (suite-B.txt), most
# telling first, each under its own timeout and all within DEVICE_BUDGET seconds (default
# 540, to fit the device tool's 600 s a call): what no longer fits is listed as not run.
# DEVICE_PLAN="cuda:gpu vulkan:suite ..." runs other stages.
#
# --dry-run runs the same plan here, without a GPU: the local .venv instead of the
# installation, the builds from .device/llama.tar.xz, one test folder for the suite
# (DEVICE_SUITE). It proves the script, not the figures.
export PYTHONUNBUFFERED=1
dry=0
if [ "${1:-}" = --dry-run ]; then dry=1; shift; fi
out=${OUT:-/tmp/mmd-device}
mkdir -p "$out"
here=$(pwd)/.device
llama=/tmp/mmd-llama
started=$(date +%s)
{
  if [ $dry = 1 ]; then
    venv=$(pwd)/.venv
    echo "dry run: $venv, no installation"
  else
    venv=/tmp/mmd-venv
    for deb in "$here"/debs/*.deb; do [ -e "$deb" ] && dpkg -x "$deb" /; done
    ldconfig
    python3 -m venv "$venv"
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # The machine's python3 is itself a virtual environment: its packages come in by a .pth.
    python3 -c 'import site; print(site.getsitepackages()[0])' >"$site/zz-machine.pth"
    "$venv/bin/pip" install -q --no-index --no-deps "$here"/wheels/*.whl
    "$venv/bin/pip" install -q --no-index --no-deps --no-build-isolation -e .
  fi
  rm -rf "$llama" && mkdir -p "$llama" && tar -xJf "$here/llama.tar.xz" -C "$llama"
  if [ $dry = 0 ] && [ -d "$llama/bundled" ]; then cp -r "$llama"/bundled/* "$site/"; fi
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv ||
    echo "no nvidia-smi"
  # cuBLAS (567 MB) is not carried: the CUDA build uses the machine's, where it has one.
  if [ -e "$llama/cuda/bin/libggml-cuda.so" ]; then
    for lib in $(readelf -d "$llama/cuda/bin/libggml-cuda.so" |
      sed -n 's/.*NEEDED.*\[\(libcublas[A-Za-z]*\.so\.[0-9]*\)\]/\1/p'); do
      [ -e "$llama/cuda/bin/$lib" ] && continue
      found=$( (ldconfig -p | sed -n "s/.*$lib.* => //p"
        ls /usr/local/cuda*/lib64/"$lib" /usr/local/cuda*/targets/*/lib/"$lib" \
          /usr/lib/python3*/site-packages/nvidia/*/lib/"$lib" \
          /usr/local/lib/python3*/*-packages/nvidia/*/lib/"$lib" \
          "$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')"/nvidia/*/lib/"$lib"
      ) 2>/dev/null | head -1)
      if [ -n "$found" ]; then
        ln -s "$found" "$llama/cuda/bin/$lib" && echo "cuda build: $lib from $found"
      else
        echo "cuda build: $lib not on this machine (not carried: too large)"
      fi
    done
    missing=$(ldd "$llama/cuda/bin/libggml-cuda.so" | sed -n 's/^[[:space:]]*\([^ ]*\) => not found/\1/p')
    if [ -n "$missing" ] && [ $dry = 1 ]; then
      echo "cuda build: lacks $(echo $missing); dry run: used anyway (it serves on the CPU)"
    elif [ -n "$missing" ]; then
      # llama-server would quietly serve on the CPU: not a CUDA run.
      echo "lacks $(echo $missing)" >"$llama/cuda/unusable"
      echo "cuda build: unusable here, lacks $(echo $missing)"
    fi
  fi
  for server in "$llama"/cuda/bin/llama-server "$llama"/bundled/*/bin/llama-server \
    "$llama"/built/bin/llama-server; do
    [ -x "$server" ] && echo "$server" && "$server" --list-devices 2>&1
  done
} >"$out/setup.txt" 2>&1
if [ $dry = 0 ] && ! grep -A5 "Available devices" "$out/setup.txt" | grep -q "Vulkan.*NVIDIA"; then
  # Where the loader does not find the driver's ICD by itself.
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
export PATH="$venv/bin:$PATH"
if [ $# -gt 0 ]; then
  "$@" 2>&1 | tee "$out/run.txt"
  exit "${PIPESTATUS[0]}"
fi

server_of() {  # the llama-server of a backend, or nothing
  case "$1" in
    cuda) [ -e "$llama/cuda/unusable" ] || ls "$llama"/cuda/bin/llama-server 2>/dev/null ;;
    vulkan) ls "$llama"/bundled/*/bin/llama-server 2>/dev/null | head -1 ;;
  esac
}
limit_of() {  # a stage's own timeout in seconds
  case "$1" in gpu) echo 90 ;; figures) echo 60 ;; bench) echo 90 ;; suite) echo 200 ;; esac
}
suite=${DEVICE_SUITE:-}
[ $dry = 1 ] && suite=${DEVICE_SUITE:-tests/runtime}
budget=${DEVICE_BUDGET:-540}
plan=${DEVICE_PLAN:-cuda:gpu cuda:figures vulkan:gpu vulkan:figures cuda:bench vulkan:bench cuda:suite vulkan:suite}
: >"$out/summary.txt"
for item in $plan; do
  backend=${item%%:*} stage=${item#*:}
  server=$(server_of "$backend")
  left=$((budget - ($(date +%s) - started)))
  limit=$(limit_of "$stage")
  [ "$limit" -gt "$left" ] && limit=$left
  if [ -z "$server" ]; then
    why="no $backend build in .device"
    [ -e "$llama/$backend/unusable" ] && why="the $backend build $(cat "$llama/$backend/unusable")"
    echo "$item: not run: $why" >>"$out/summary.txt"
    continue
  fi
  if [ "$limit" -lt 20 ]; then
    echo "$item: not run: out of time (${left}s of DEVICE_BUDGET left)" >>"$out/summary.txt"
    continue
  fi
  file="$out/$stage-$backend.txt"
  t0=$(date +%s)
  # The build's folder first on PATH: mmd's automatic choice, the tests' and the bench's.
  (
    export PATH="$(dirname "$server"):$PATH" MMD_TEST_LLAMA_SERVER="$server"
    case "$stage" in
      gpu) timeout "$limit" python -m pytest -m gpu -v -rA -p no:cacheprovider ;;
      figures) timeout "$limit" python scripts/device/figures.py "$server" --label "$backend" ;;
      bench) timeout "$limit" python bench/run.py --quick &&
        cp bench/results/latest.json "$out/bench-$backend.json" ;;
      # shellcheck disable=SC2086  # one word per argument
      suite) timeout "$limit" python -m pytest -m "not gpu" -q -p no:cacheprovider $suite ;;
    esac
  ) >"$file" 2>&1
  rc=$?
  echo "rc=$rc" >>"$file"
  echo "$item: rc=$rc in $(($(date +%s) - t0))s (limit ${limit}s): $(grep -v '^rc=' "$file" | tail -1)" >>"$out/summary.txt"
  # A stage cut by its timeout can leave llama-servers running (the bench's direct floors,
  # figures.py's child): they would hold GPU memory into the next stage's figures.
  pattern="$(dirname "$server")/llama-server"
  left_over=$(pgrep -f "$pattern" | wc -l)
  if [ "$left_over" -gt 0 ]; then
    pkill -KILL -f "$pattern"
    echo "$item: killed $left_over llama-server(s) it left running" >>"$out/summary.txt"
  fi
done
echo "total $(($(date +%s) - started))s" >>"$out/summary.txt"
cat "$out/summary.txt"
