#!/usr/bin/env bash
# tests/test_cuda_emulated.py (csrc/cuda's kernels and host code on the CPU emulation) built with
# AddressSanitizer and UBSan's alignment check: an out-of-bounds or use-after-free access by any
# kernel fails the run, with ASan's report (the kernel, the access, the tensor's allocation)
# printed, and so does a vector access at an address its width does not divide (a GPU faults).
# Extra arguments go to pytest, e.g. `scripts/cuda_emu_asan.sh -k dual`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CXX=${CXX:-c++}
asan=$("$CXX" -print-file-name=libasan.so)
stdcxx=$("$CXX" -print-file-name=libstdc++.so)
if [ ! -f "$asan" ]; then
  echo "cuda_emu_asan: $CXX has no libasan.so" >&2
  exit 1
fi
logdir=$(mktemp -d)
# libstdc++ is preloaded with the runtime so that ASan's C++-exception interceptor finds it.
set +e
FASTNN_CUDA_EMU_ASAN=1 LD_PRELOAD="$asan $stdcxx" \
  ASAN_OPTIONS="detect_leaks=0:log_path=$logdir/asan" \
  python -m pytest tests/test_cuda_emulated.py -q -p no:cacheprovider "$@" 2>&1 |
  tee "$logdir/pytest.log"
rc=${PIPESTATUS[0]}
set -e
# ASan writes its reports (and a warning about makecontext it always gives) to the log files.
if grep -l "ERROR: AddressSanitizer" "$logdir"/asan.* > /dev/null 2>&1; then
  cat "$logdir"/asan.*
  echo "cuda_emu_asan: AddressSanitizer found errors" >&2
  exit 1
fi
# UBSan's alignment check traps: the test named in Python's fatal-error traceback above made a
# vector access at an address its width does not divide.
if grep -q "Fatal Python error: Illegal instruction" "$logdir/pytest.log"; then
  echo "cuda_emu_asan: a misaligned vector access (UBSan alignment trap) in the test above" >&2
  exit 1
fi
rm -rf "$logdir"
exit "$rc"
