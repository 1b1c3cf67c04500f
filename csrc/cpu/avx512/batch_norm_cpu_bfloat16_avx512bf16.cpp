// fastnn._C_avx512's bfloat16 CPU kernels for CPUs with AVX512-BF16 (module_avx512.cpp picks them
// over batch_norm_cpu_bfloat16_avx512.cpp's where the CPU has it): the same source, whose stores
// round 32 floats to bfloat16 with one vcvtne2ps2bf16 instead of ATen's integer sequence (about
// 17 operations); see Unit::narrow in batch_norm_cpu_vec.h. The headers the kernels use come
// first, built as everywhere else; only this file's own code is built for AVX512-BF16.
#include "../batch_norm_cpu_table.h"
#if defined(FASTNN_HAVE_AVX512BF16_KERNELS)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>
#include <torch/version.h>

#pragma GCC target("avx512bf16")
#define FASTNN_CPU_DTYPE BFloat16
#define FASTNN_CPU_BF16_NATIVE 1
#include "../batch_norm_cpu_kernels.h"
#endif
