// The CPU registration of the fastnn ops: each call goes to the kernels of its input's dtype
// (batch_norm_cpu_<dtype>.cpp, tables in batch_norm_cpu_table.h). The bfloat16 and float16 ones
// are fastnn._C's own unless fastnn._C_avx512's, built for AVX-512, were handed over at import on
// a CPU that has it: AVX-512 made those kernels 1.22x faster in geometric mean
// (benchmarks/results/cpu-isa-avx512-2026-11-29) and did not speed up float32 and float64.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <atomic>
#include <tuple>
#include <utility>

#include "batch_norm_cpu_table.h"

namespace fastnn {
namespace cpu {
namespace {

// fastnn._C_avx512's bfloat16 and float16 tables once handed over; null: fastnn._C's own.
std::atomic<const KernelTable*> g_bfloat16{nullptr};
std::atomic<const KernelTable*> g_float16{nullptr};

const KernelTable& handed_or(const std::atomic<const KernelTable*>& handed,
                             const KernelTable* own) {
  const KernelTable* t = handed.load(std::memory_order_acquire);
  return t != nullptr ? *t : *own;
}

// The kernels for an op's first tensor (the ops check that the others have its dtype). Other
// dtypes go to the float32 kernels, whose argument checks reject them by name.
const KernelTable& table_for(at::ScalarType t) {
  switch (t) {
    case at::ScalarType::Double:
      return *kernels<at::ScalarType::Double>();
    case at::ScalarType::BFloat16:
      return handed_or(g_bfloat16, kernels<at::ScalarType::BFloat16>());
    case at::ScalarType::Half:
      return handed_or(g_float16, kernels<at::ScalarType::Half>());
    default:
      return *kernels<at::ScalarType::Float>();
  }
}
const KernelTable& table_for(const Tensor& t) { return table_for(t.scalar_type()); }
const KernelTable& table_for(at::TensorList ts) {
  return table_for(ts.empty() ? at::ScalarType::Float : ts[0].scalar_type());
}

// The registered kernel of an op: the table entry Member for the op's first argument.
template <typename Fn>
struct Route;
template <typename R, typename... A>
struct Route<R (*)(A...)> {
  template <R (*KernelTable::*Member)(A...)>
  static R call(A... args) {
    return (table_for(std::get<0>(std::forward_as_tuple(args...))).*Member)(args...);
  }
};

}  // namespace

// Called once by fastnn._ext with the capsule of fastnn._C_avx512; false (and nothing changed)
// for tables of another version.
bool set_reduced_cpu_kernels(const void* tables) {
  const auto* t = static_cast<const ReducedKernelTables*>(tables);
  if (t == nullptr || t->version != kKernelTableVersion || t->bfloat16 == nullptr ||
      t->float16 == nullptr) {
    return false;
  }
  g_bfloat16.store(t->bfloat16, std::memory_order_release);
  g_float16.store(t->float16, std::memory_order_release);
  return true;
}

}  // namespace cpu
}  // namespace fastnn

#define FASTNN_ROUTE(member)                                                               \
  &fastnn::cpu::Route<decltype(fastnn::cpu::KernelTable::member)>::template call<          \
      &fastnn::cpu::KernelTable::member>

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  m.impl("batch_norm_train", FASTNN_ROUTE(train));
  m.impl("batch_norm_eval", FASTNN_ROUTE(eval));
  m.impl("batch_norm_train_masked", FASTNN_ROUTE(train_masked));
  m.impl("batch_norm_backward", FASTNN_ROUTE(backward));
  m.impl("batch_norm_stats", FASTNN_ROUTE(stats));
  m.impl("batch_norm_dual", FASTNN_ROUTE(dual));
  m.impl("batch_norm_dual_masked", FASTNN_ROUTE(dual_masked));
  m.impl("batch_norm_dual_backward", FASTNN_ROUTE(dual_backward));
  m.impl("batch_norm_train_with_stats", FASTNN_ROUTE(train_with_stats));
  m.impl("batch_norm_backward_reduce", FASTNN_ROUTE(backward_reduce));
  m.impl("batch_norm_backward_elemt", FASTNN_ROUTE(backward_elemt));
  m.impl("batch_norm_cat_with_stats", FASTNN_ROUTE(cat_with_stats));
}
