#!/usr/bin/env bash
# On a lent GPU machine, from the project root (carried there with .device/ by the device
# tool): install the carried wheels, llama-server and Vulkan loader over the machine's
# Python, install mmd, then run COMMAND, or by default the GPU tests, the whole suite and
# the quick benchmark. Everything it writes goes to $OUT (setup.txt, gpu-tests.txt,
# suite.txt, bench.txt, bench.json). A carried `make llama` build runs the GPU tests.
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/mmd-device}
mkdir -p "$out"
here=$(pwd)/.device
venv=/tmp/mmd-venv
{
  for deb in "$here"/debs/*.deb; do [ -e "$deb" ] && dpkg -x "$deb" /; done
  ldconfig
  python3 -m venv "$venv"
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # The machine's python3 is itself a virtual environment: its packages come in by a .pth.
  python3 -c 'import site; print(site.getsitepackages()[0])' >"$site/zz-machine.pth"
  "$venv/bin/pip" install -q --no-index --no-deps "$here"/wheels/*.whl
  "$venv/bin/pip" install -q --no-index --no-deps --no-build-isolation -e .
  mkdir -p /tmp/mmd-llama && tar -xJf "$here/llama.tar.xz" -C /tmp/mmd-llama
  if [ -d /tmp/mmd-llama/bundled ]; then cp -r /tmp/mmd-llama/bundled/* "$site/"; fi
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
  for server in "$site"/*/bin/llama-server /tmp/mmd-llama/built/bin/llama-server; do
    [ -x "$server" ] && echo "$server" && "$server" --list-devices
  done
} >"$out/setup.txt" 2>&1
if ! grep -A5 "Available devices" "$out/setup.txt" | grep -q NVIDIA; then
  # Where the loader does not find the driver's ICD by itself.
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
export PATH="$venv/bin:$PATH"
if [ -x /tmp/mmd-llama/built/bin/llama-server ]; then
  export MMD_TEST_LLAMA_SERVER=/tmp/mmd-llama/built/bin/llama-server  # the GPU tests use it
fi
if [ $# -gt 0 ]; then
  "$@" 2>&1 | tee "$out/run.txt"
  exit "${PIPESTATUS[0]}"
fi
timeout 150 python -m pytest -m gpu -v -rA -p no:cacheprovider >"$out/gpu-tests.txt" 2>&1
echo "rc=$?" >>"$out/gpu-tests.txt"
timeout 240 python -m pytest -m "not gpu" -q -p no:cacheprovider >"$out/suite.txt" 2>&1
echo "rc=$?" >>"$out/suite.txt"
timeout 150 python bench/run.py --quick >"$out/bench.txt" 2>&1
echo "rc=$?" >>"$out/bench.txt"
cp bench/results/latest.json "$out/bench.json" 2>/dev/null
tail -n 3 "$out"/*.txt
