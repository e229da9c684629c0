#!/usr/bin/env bash
# make test's runtime check: a llama.cpp CPU backend without run-time dispatch must not
# use AVX-512, or its llama-server dies with SIGILL on AVX2-only CPUs (most desktops,
# laptops and many servers). A build with per-CPU variants (libggml-cpu-<variant>.so,
# from GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS) picks one that this CPU runs at start.
# Usage: check_cpu_backend.sh DIR...   (folders holding llama-server and its libraries)
set -euo pipefail
command -v objdump >/dev/null || { echo "check_cpu_backend: objdump (binutils) is needed" >&2; exit 2; }
status=0
for dir in "$@"; do
  if compgen -G "$dir/libggml-cpu-*.so" >/dev/null; then
    echo "ok: $dir has per-CPU variants: $(cd "$dir" && ls libggml-cpu-*.so | sed 's/libggml-cpu-//; s/\.so$//' | tr '\n' ' ')"
    continue
  fi
  lib=$(find "$dir" -maxdepth 1 -name 'libggml-cpu.so*' -type f | head -1)
  if [ -z "$lib" ]; then
    echo "check_cpu_backend: no libggml-cpu in $dir" >&2
    status=1
    continue
  fi
  zmm=$(objdump -d --no-show-raw-insn "$lib" | grep -c zmm || true)
  if [ "$zmm" -gt 0 ]; then
    echo "check_cpu_backend: $lib has $zmm AVX-512 (zmm) instructions and no per-CPU variants: it dies with SIGILL on AVX2-only CPUs" >&2
    status=1
  else
    echo "ok: $lib has no AVX-512 instructions"
  fi
done
exit $status
