#!/usr/bin/env bash
# Compiles fastnn._C for the GPU machine on this one, into .device-build/, so that
# scripts/gpu_check.sh there can load it instead of compiling (its `build` step checks the stamp:
# the same sources, Python and torch, else it compiles as usual). The GPU machine has Python 3.12
# and torch 2.11.0+cu130 and runs on Hopper (sm_90); this builds with a Python and torch of those
# versions, made into a virtual environment on first use (a CUDA build of torch from the package
# index, about 5 GB) unless DEVICE_PYTHON names one.
#
#   scripts/device_prebuild.sh            # then carry .device-build to the GPU machine
#   scripts/device_prebuild.sh --test     # and run the test suite here on what it built
#
# --test runs the whole test suite on this machine's CPU with that Python and torch, against a
# copy of the checkout holding the new build (its CPU kernels are the ones the GPU machine will
# load; the CUDA tests skip without a GPU). Test dependencies are installed into the environment
# made here; a DEVICE_PYTHON must have them.
#
# Environment: DEVICE_PYTHON (an interpreter with the GPU machine's torch), DEVICE_PY_VERSION
# (default 3.12), DEVICE_TORCH (default 2.11.0), DEVICE_TORCHVISION (default 0.26.0, for
# --test), DEVICE_VENV (where to make the environment), TORCH_CUDA_ARCH_LIST (default 9.0),
# MAX_JOBS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
DEST="$ROOT/.device-build"
PYVER=${DEVICE_PY_VERSION:-3.12}
TORCH_VERSION=${DEVICE_TORCH:-2.11.0}
TORCHVISION_VERSION=${DEVICE_TORCHVISION:-0.26.0}
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
TEST=0
for arg in "$@"; do
  case $arg in
    --test) TEST=1 ;;
    *) echo "usage: scripts/device_prebuild.sh [--test]" >&2; exit 2 ;;
  esac
done

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
  if [ "$TEST" = 1 ]; then
    # requirements.txt less its torch pins (this environment keeps its torch); what is there
    # already is left as it is.
    grep -v -E '^(torch|torchvision|setuptools)([=<> ]|$)' requirements.txt |
      grep -v -E '^\s*(#|$)' |
      xargs "$PY" -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  fi
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

if [ "$TEST" = 1 ]; then
  if ! git rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    echo "device_prebuild: --test takes the checkout's files from git; this is not a checkout" >&2
    exit 1
  fi
  # The checkout's files (tracked, and untracked ones git does not ignore) with the new build in
  # place of this machine's.
  tree="$work/tree"
  mkdir -p "$tree"
  git ls-files -z --cached --others --exclude-standard | tar -c --null -T - | tar -x -C "$tree"
  rm -f "$tree"/fastnn/*.so "$tree/fastnn/_build_info.py"
  cp "$DEST"/_C*.so "$DEST/_build_info.py" "$tree/fastnn/"
  workers=()
  "$PY" -c "import xdist" > /dev/null 2>&1 && workers=(-n auto)
  echo "device_prebuild: running the tests with $PY (torch $torch_version) on this build"
  (cd "$tree" && PYTHONPATH="$tree" "$PY" -m pytest tests -q -rs -p no:cacheprovider \
    ${workers[@]+"${workers[@]}"})
fi
