// fastnn._C_avx512: csrc/cpu/batch_norm_cpu.cpp built for AVX-512 with FASTNN_CPU_KERNEL_TABLE
// (setup.py passes the flags). A separate file, so that its object does not share a path with
// fastnn._C's build of the same source.
#include "../batch_norm_cpu.cpp"
