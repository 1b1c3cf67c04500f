#!/usr/bin/env bash
# Compiles fastnn._C for the GPU machine on this one, into .device-build/, so that
# scripts/gpu_check.sh there can load it instead of compiling (its `build` step checks the stamp:
# the same sources, Python and torch, else it compiles as usual). The GPU machine has Python 3.12
# and torch 2.11.0+cu130 and runs on Hopper (sm_90); this builds with a Python and torch of those
# versions, made into a virtual environment on first use (a CUDA build of torch from the package
# index, about 5 GB) unless DEVICE_PYTHON names one.
#
#   scripts/device_prebuild.sh            # then carry .device-build to the GPU machine
#
# Environment: DEVICE_PYTHON (an interpreter with the GPU machine's torch), DEVICE_PY_VERSION
# (default 3.12), DEVICE_TORCH (default 2.11.0), DEVICE_VENV (where to make the environment),
# TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
DEST="$ROOT/.device-build"
PYVER=${DEVICE_PY_VERSION:-3.12}
TORCH_VERSION=${DEVICE_TORCH:-2.11.0}
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}

PY=${DEVICE_PYTHON:-}
if [ -z "$PY" ]; then
  VENV=${DEVICE_VENV:-$HOME/.cache/fastnn/device-py$PYVER-torch$TORCH_VERSION}
  if [ ! -x "$VENV/bin/python" ]; then
    # python3.12 on PATH, else one that pyenv has installed but not activated.
    base=""
    for cand in "python$PYVER" "$(pyenv root 2>/dev/null)"/versions/"$PYVER"*/bin/"python$PYVER"; do
      if "$cand" --version > /dev/null 2>&1; then
        base=$cand
        break
      fi
    done
    if [ -z "$base" ]; then
      echo "device_prebuild: no python$PYVER here; set DEVICE_PYTHON" >&2
      exit 1
    fi
    "$base" -m venv "$VENV"
    # torch pins setuptools below 82 for its C++ extension builds; fastnn needs 77 or newer.
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "setuptools>=77,<82" ninja
  fi
  PY="$VENV/bin/python"
fi
torch_version=$("$PY" -c 'import torch; print(torch.__version__)')
ext_suffix=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
case "$torch_version" in
  "$TORCH_VERSION"*) ;;
  *) echo "device_prebuild: $PY has torch $torch_version, not $TORCH_VERSION" >&2; exit 1 ;;
esac

# A copy of the sources, so that the checkout's own build (for this machine's torch) stays; the
# stamp's hash is of what was copied.
sources=$(bash "$ROOT/scripts/source_hash.sh")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r setup.py build_env.py pyproject.toml LICENSE csrc fastnn "$work/"
rm -f "$work"/fastnn/*.so "$work/fastnn/_build_info.py"
# AVX2 CPU kernels (and the AVX-512 ones, used where that CPU has it): any x86-64 server.
(cd "$work" && env TORCH_CUDA_ARCH_LIST="$ARCH" FASTNN_CUDA=1 FASTNN_CPU_ARCH=avx2 \
  "$PY" setup.py -q build_ext --inplace)

rm -rf "$DEST"
mkdir -p "$DEST"
for so in "$work"/fastnn/_C*"$ext_suffix"; do
  # Host debug sections are most of the file; the kernels' line info (for ncu) stays.
  strip --strip-debug -o "$DEST/$(basename "$so")" "$so"
done
cp "$work/fastnn/_build_info.py" "$DEST/"
{
  echo "sources: $sources"
  echo "torch: $torch_version"
  echo "ext_suffix: $ext_suffix"
  echo "cuda_arch: $ARCH"
  changed=$(git status --short -- csrc setup.py build_env.py 2>/dev/null | wc -l)
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo n/a) ($changed changed source files)"
  echo "built: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)"
} > "$DEST/STAMP"
cat "$DEST/STAMP"
du -sh "$DEST"
