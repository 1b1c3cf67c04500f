#!/usr/bin/env bash
# tests/test_cuda_emulated.py (csrc/cuda's kernels and host code on the CPU emulation) built with
# AddressSanitizer: an out-of-bounds or use-after-free access by any kernel fails the run, with
# ASan's report (the kernel, the access, the tensor's allocation) printed. Extra arguments go to
# pytest, e.g. `scripts/cuda_emu_asan.sh -k dual`.
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
rc=0
FASTNN_CUDA_EMU_ASAN=1 LD_PRELOAD="$asan $stdcxx" \
  ASAN_OPTIONS="detect_leaks=0:log_path=$logdir/asan" \
  python -m pytest tests/test_cuda_emulated.py -q -p no:cacheprovider "$@" || rc=$?
# ASan writes its reports (and a warning about makecontext it always gives) to the log files.
if grep -l "ERROR: AddressSanitizer" "$logdir"/asan.* > /dev/null 2>&1; then
  cat "$logdir"/asan.*
  echo "cuda_emu_asan: AddressSanitizer found errors" >&2
  exit 1
fi
rm -rf "$logdir"
exit "$rc"
