// cuda_emu stand-in for <cuda_runtime.h>: the emulated runtime (tests/cuda_emu/emu.h).
#pragma once
#include "emu.h"
