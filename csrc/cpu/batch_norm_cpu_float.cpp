// fastnn._C's float32 CPU kernels (see batch_norm_cpu_table.h).
#define FASTNN_CPU_DTYPE Float
#include "batch_norm_cpu_kernels.h"

namespace fastnn {
namespace cpu {
// For fastnn._C's _cpu_caches(): the cache sizes the CPU kernels plan with.
std::array<int64_t, 4> cpu_cache_plan() {
  return {level2_cache_bytes(), last_level_cache_bytes(), stream_min_bytes(),
          stream_min_bytes_one_pass()};
}
}  // namespace cpu
}  // namespace fastnn
