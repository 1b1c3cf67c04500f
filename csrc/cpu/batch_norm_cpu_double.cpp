// fastnn._C's float64 CPU kernels (see batch_norm_cpu_table.h).
#define FASTNN_CPU_DTYPE Double
#include "batch_norm_cpu_kernels.h"
