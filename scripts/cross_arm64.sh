#!/usr/bin/env bash
# make test's aarch64 llama-server: `make llama` with CROSS=aarch64, built once and kept
# under $XDG_CACHE_HOME/mmd/llama-aarch64/KEY, where KEY hashes scripts/build_llama.sh
# (which pins the llama.cpp source by hash) less its GPU parts (its CUDA section and any
# line naming CUDA, cuBLAS or Vulkan, which a CPU build does not run): a new pin or CPU
# build recipe builds anew, and the older build is removed. tests/runtime/test_arm64_runtime.py runs it under
# qemu-aarch64. Skipped (said so) without the cross compiler or qemu-user, unless
# MMD_REQUIRE_ARM64 is set (.ci/run sets it where it installed them): then it must build.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${XDG_CACHE_HOME:-$HOME/.cache}/mmd/llama-aarch64
key=$(sed '/^# CUDA:/,/^fi$/d' scripts/build_llama.sh | grep -viE 'cuda|cublas|vulkan|^[[:space:]]*$' |
  sha256sum | cut -c1-16)
prefix=$cache/$key
if [ "${1:-}" = --prefix ]; then  # where the build is (or will be): for the test
  echo "$prefix"
  exit 0
fi
if [ -x "$prefix/bin/llama-server" ]; then
  echo "aarch64 llama-server: cached in $prefix"
  exit 0
fi
missing=()
[ "$(uname -m)" = x86_64 ] || missing+=("an x86-64 machine")
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ -n "${MMD_REQUIRE_ARM64:-}" ]; then
    echo "cross_arm64: MMD_REQUIRE_ARM64 is set but this needs ${missing[*]}" >&2
    exit 1
  fi
  echo "aarch64 llama-server: not built (needs ${missing[*]}; .ci/run installs them); its test skips"
  exit 0
fi
echo "== cross-building llama-server for aarch64, once per machine (16-26 min on 2 cores; cached in $cache)"
nice -n 19 env CROSS=aarch64 BACKEND=cpu PREFIX="$prefix" JOBS="${JOBS:-$(nproc)}" \
  bash scripts/build_llama.sh
find "$cache" -mindepth 1 -maxdepth 1 ! -name "$key" -exec rm -rf {} +
