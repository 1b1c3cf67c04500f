// The shared argument checks, built into fastnn._C_avx512 as well: its kernels call them.
#include "../../batch_norm_common.cpp"
