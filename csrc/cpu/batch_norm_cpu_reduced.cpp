// fastnn._C's bfloat16 and float16 CPU kernels: batch_norm_cpu.cpp built for those dtypes only, in
// a translation unit of its own so that it compiles alongside the float32/float64 one (see the
// end of batch_norm_cpu.cpp).
#define FASTNN_CPU_REDUCED 1
#include "batch_norm_cpu.cpp"
