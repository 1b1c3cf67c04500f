// fastnn._C's bfloat16 CPU kernels (see batch_norm_cpu_table.h).
#define FASTNN_CPU_DTYPE BFloat16
#include "batch_norm_cpu_kernels.h"
