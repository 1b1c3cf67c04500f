// fastnn._C_avx512's bfloat16 CPU kernels: the same source as fastnn._C's, built for AVX-512.
#define FASTNN_CPU_DTYPE BFloat16
#include "../batch_norm_cpu_kernels.h"
