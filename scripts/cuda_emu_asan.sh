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
# The emulated kernels run on one thread: with pytest-xdist the tests spread over one process a
# core (FASTNN_ASAN_WORKERS, default auto; 0 runs them in this process). Each process writes
# its own ASan log; a worker that ASan or the alignment trap stops is reported and replaced.
workers=()
if python -c "import xdist" > /dev/null 2>&1 && [ "${FASTNN_ASAN_WORKERS:-auto}" != 0 ]; then
  workers=(-n "${FASTNN_ASAN_WORKERS:-auto}")
fi
# libstdc++ is preloaded with the runtime so that ASan's C++-exception interceptor finds it.
set +e
FASTNN_CUDA_EMU_ASAN=1 LD_PRELOAD="$asan $stdcxx" \
  ASAN_OPTIONS="detect_leaks=0:log_path=$logdir/asan" \
  python -m pytest tests/test_cuda_emulated.py -q -p no:cacheprovider -p no:benchmark \
    ${workers[@]+"${workers[@]}"} "$@" 2>&1 |
  tee "$logdir/pytest.log"
rc=${PIPESTATUS[0]}
set -e
# ASan writes its reports (and a warning about makecontext it always gives) to the log files.
if grep -l "ERROR: AddressSanitizer" "$logdir"/asan.* > /dev/null 2>&1; then
  cat "$logdir"/asan.*
  echo "cuda_emu_asan: AddressSanitizer found errors" >&2
  exit 1
fi
# UBSan's alignment check traps: the test named in Python's fatal-error traceback above (or in
# pytest-xdist's "worker crashed while running" lines) made a vector access at an address its
# width does not divide.
if grep -q "Fatal Python error: Illegal instruction" "$logdir/pytest.log"; then
  grep "crashed while running" "$logdir/pytest.log" >&2 || true
  echo "cuda_emu_asan: a misaligned vector access (UBSan alignment trap) in the test above" >&2
  exit 1
fi
rm -rf "$logdir"
exit "$rc"
