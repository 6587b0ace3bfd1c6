#!/usr/bin/env bash
# Installs what `cargo build --features cuda` needs on a machine without a CUDA toolkit, from the
# package registries alone (see docs/cuda.md for why these pieces and these versions):
#   - CUDA 13.0 compiler, headers and libraries as NVIDIA's PyPI wheels, into a venv;
#   - the driver library libcuda.so.1 from Debian's non-free `libcuda1`, unpacked (not installed),
#     needed only so the linker can resolve the driver API; the GPU machine brings its own driver.
# Idempotent: re-running checks what is there and installs only what is missing.
# Usage: scripts/cuda/install-toolkit.sh            (into $CUDA_VENV, default /work/venv-cuda)
# Afterwards, $CUDA_VENV/cuda is a CUDA_HOME-shaped folder: bin/nvcc, include/, lib/ (with the
# unversioned .so names the linker wants).
set -euo pipefail

VENV=${CUDA_VENV:-/work/venv-cuda}
PY=${PYTHON:-python3}
# CUDA 13.0 everywhere: the GPU machines' driver (580) speaks CUDA 13.0, so PTX from a newer nvcc
# would not load there (the driver rejects a newer PTX ISA), and 13.0 libraries are what their
# PyTorch (cu130) ships.
WHEELS=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-cccl==13.0.85"
  "nvidia-cuda-nvrtc==13.0.88"
  "nvidia-cublas==13.0.2.14"
  "nvidia-curand==10.4.0.35"
  # CUPTI: only for the kernel tracer of benches/cuda (kernel timelines on the GPU machines).
  "nvidia-cuda-cupti==13.0.85"
)
LIBCUDA_DEB_VERSION=535.261.03-1

if [ ! -x "$VENV/bin/python" ]; then
  echo "install-toolkit: creating venv $VENV" >&2
  "$PY" -m venv "$VENV"
fi
missing=()
for w in "${WHEELS[@]}"; do
  name=${w%%==*}; want=${w##*==}
  have=$("$VENV/bin/python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)
  [ "$have" = "$want" ] || missing+=("$w")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-toolkit: pip installing ${missing[*]}" >&2
  "$VENV/bin/python" -m pip install --no-deps --only-binary=:all: -q "${missing[@]}"
fi

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CU=$SITE/nvidia/cu13
for f in "$CU/bin/nvcc" "$CU/nvvm/bin/cicc" "$CU/include/cuda_runtime.h" "$CU/lib/libcudart.so.13" \
         "$CU/lib/libcublas.so.13" "$CU/lib/libcublasLt.so.13" "$CU/lib/libnvrtc.so.13" "$CU/lib/libcurand.so.10"; do
  [ -e "$f" ] || { echo "install-toolkit: $f is missing after the wheel install" >&2; exit 1; }
done
chmod +x "$CU"/bin/* "$CU"/nvvm/bin/* 2>/dev/null || true

# The driver library, for linking only.
DRV=$VENV/driver
if [ ! -e "$DRV/libcuda.so.1" ]; then
  echo "install-toolkit: fetching Debian's libcuda1 $LIBCUDA_DEB_VERSION (non-free) for link time" >&2
  tmp=$(mktemp -d)
  mkdir -p "$tmp/lists/partial"
  echo "deb http://deb.debian.org/debian bookworm non-free" >"$tmp/sources.list"
  o=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$tmp/lists" -o Dir::Cache=$tmp/cache)
  apt-get "${o[@]}" update -qq
  (cd "$tmp" && apt-get "${o[@]}" download "libcuda1=$LIBCUDA_DEB_VERSION")
  dpkg-deb -x "$tmp"/libcuda1_*.deb "$tmp/x"
  real=$(find "$tmp/x" -name 'libcuda.so.5*' -type f | head -n1)
  [ -n "$real" ] || { echo "install-toolkit: no libcuda.so.<version> in the libcuda1 package" >&2; exit 1; }
  mkdir -p "$DRV"
  cp "$real" "$DRV/libcuda.so.1"
  rm -rf "$tmp"
fi

# A CUDA_HOME-shaped view: what cudarc's and candle-kernels' build scripts look for.
HOME_DIR=$VENV/cuda
mkdir -p "$HOME_DIR/lib"
ln -sfn "$CU/bin" "$HOME_DIR/bin"
ln -sfn "$CU/nvvm" "$HOME_DIR/nvvm"
ln -sfn "$CU/include" "$HOME_DIR/include"
for l in cudart cublas cublasLt nvrtc curand; do
  so=$(ls "$CU/lib/lib$l.so."* | grep -E "lib$l\.so\.[0-9]+$" | head -n1)
  ln -sfn "$so" "$HOME_DIR/lib/lib$l.so"
done
ln -sfn "$DRV/libcuda.so.1" "$HOME_DIR/lib/libcuda.so"
"$HOME_DIR/bin/nvcc" --version | tail -n2 >&2
echo "install-toolkit: CUDA_HOME=$HOME_DIR" >&2
