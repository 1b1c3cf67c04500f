// The shared argument checks, built into fastnn._C_avx512 as well (see batch_norm_cpu_avx512.cpp).
#include "../../batch_norm_common.cpp"
