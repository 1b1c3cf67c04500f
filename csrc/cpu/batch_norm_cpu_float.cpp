// fastnn._C's float32 CPU kernels (see batch_norm_cpu_table.h).
#define FASTNN_CPU_DTYPE Float
#include "batch_norm_cpu_kernels.h"
