// cuda_emu stand-in for <c10/cuda/CUDAException.h>: the emulated runtime (tests/cuda_emu/emu.h).
#pragma once
#include "emu.h"
