// fastnn._C's float16 CPU kernels (see batch_norm_cpu_table.h).
#define FASTNN_CPU_DTYPE Half
#include "batch_norm_cpu_kernels.h"
