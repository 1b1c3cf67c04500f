// fastnn._C_avx512: csrc/cpu/batch_norm_cpu.cpp's bfloat16 and float16 kernels built for AVX-512,
// handed to fastnn._C as a table (FASTNN_CPU_KERNEL_TABLE; setup.py passes the flags). A separate
// file, so that its object does not share a path with fastnn._C's builds of the same source.
#define FASTNN_CPU_REDUCED 1
#include "../batch_norm_cpu.cpp"
