#!/usr/bin/env bash
# Prints one hash of what fastnn._C is compiled from (the C++ and CUDA sources, setup.py and
# build_env.py), the same on any machine for the same files. scripts/device_prebuild.sh stamps a
# build with it; scripts/gpu_check.sh uses that build only where the sources hash the same.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
{
  find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \)
  printf '%s\n' setup.py build_env.py
} | LC_ALL=C sort | xargs -d '\n' sha256sum | sha256sum | cut -d' ' -f1
