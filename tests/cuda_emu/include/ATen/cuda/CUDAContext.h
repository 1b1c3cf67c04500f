// cuda_emu stand-in for <ATen/cuda/CUDAContext.h>: the emulated runtime (tests/cuda_emu/emu.h).
#pragma once
#include "emu.h"
