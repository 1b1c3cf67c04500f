// The CPU kernels of one input dtype, as a table of entry points.
//
// batch_norm_cpu_kernels.h is compiled once per input dtype, each build in a translation unit of
// its own (batch_norm_cpu_<dtype>.cpp) so that they compile in parallel, and hands out its entry
// points as a KernelTable. batch_norm_cpu.cpp registers the ops and routes each call to the table
// of its input's dtype. fastnn._C_avx512 (avx512/) builds the bfloat16 and float16 tables again
// for AVX-512 and hands them to fastnn._C, on a CPU that has it, in a ReducedKernelTables.
#pragma once

#include <ATen/core/ATen_fwd.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace fastnn {
namespace cpu {

using OptTensor = c10::optional<at::Tensor>;
using at::Tensor;

// One member per op; signatures as in csrc/fastnn.cpp's schemas.
struct KernelTable {
  std::tuple<Tensor, Tensor, Tensor> (*train)(const Tensor& input, const OptTensor& weight,
                                              const OptTensor& bias,
                                              const OptTensor& running_mean,
                                              const OptTensor& running_var, double momentum,
                                              double eps, const OptTensor& residual, bool relu);
  std::tuple<Tensor, Tensor, Tensor, Tensor> (*train_masked)(
      const Tensor& input, const OptTensor& weight, const OptTensor& bias,
      const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps,
      const OptTensor& residual, bool relu);
  Tensor (*eval)(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                 const Tensor& running_mean, const Tensor& running_var, double eps,
                 const OptTensor& residual, bool relu);
  std::tuple<Tensor, Tensor, Tensor, Tensor> (*backward)(
      const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
      const OptTensor& output, const Tensor& mean, const Tensor& invstd, bool training, bool relu,
      bool residual_grad, const OptTensor& relu_mask);
  std::tuple<Tensor, Tensor> (*stats)(const Tensor& input);
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> (*dual)(
      const Tensor& input, const OptTensor& weight, const OptTensor& bias,
      const OptTensor& running_mean, const OptTensor& running_var, const Tensor& input2,
      const OptTensor& weight2, const OptTensor& bias2, const OptTensor& running_mean2,
      const OptTensor& running_var2, bool training, double momentum, double eps, double momentum2,
      double eps2, bool relu);
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> (*dual_masked)(
      const Tensor& input, const OptTensor& weight, const OptTensor& bias,
      const OptTensor& running_mean, const OptTensor& running_var, const Tensor& input2,
      const OptTensor& weight2, const OptTensor& bias2, const OptTensor& running_mean2,
      const OptTensor& running_var2, bool training, double momentum, double eps, double momentum2,
      double eps2, bool relu);
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> (*dual_backward)(
      const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
      const Tensor& input2, const OptTensor& weight2, const OptTensor& output, const Tensor& mean,
      const Tensor& invstd, const Tensor& mean2, const Tensor& invstd2, bool training, bool relu,
      const OptTensor& relu_mask);
  std::tuple<Tensor, Tensor, Tensor> (*train_with_stats)(
      const Tensor& input, const Tensor& mean, const Tensor& var, const OptTensor& weight,
      const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
      double momentum, double eps, const OptTensor& residual, bool relu);
  std::tuple<Tensor, Tensor, Tensor> (*backward_reduce)(
      const Tensor& grad_output, const Tensor& input, const OptTensor& output,
      const Tensor& mean, const Tensor& invstd, bool relu, bool residual_grad);
  Tensor (*backward_elemt)(const Tensor& grad_output, const Tensor& input,
                           const OptTensor& weight, const OptTensor& output, const Tensor& mean,
                           const Tensor& invstd, const Tensor& mean_dy,
                           const Tensor& mean_dy_xhat, bool relu);
  std::tuple<Tensor, Tensor, Tensor> (*cat_with_stats)(
      at::TensorList inputs, const Tensor& mean, const Tensor& var, const OptTensor& weight,
      const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
      double momentum, double eps, bool relu);
};

// What fastnn._C_avx512's `kernels` capsule holds. Bumped whenever it, KernelTable or an op's
// signature changes: tables from another build of fastnn are refused.
constexpr int kKernelTableVersion = 4;
struct ReducedKernelTables {
  int version;
  const KernelTable* bfloat16;
  const KernelTable* float16;
};

// The table of this build's kernels for input dtype T, defined by batch_norm_cpu_<dtype>.cpp.
// Hidden: fastnn._C and fastnn._C_avx512 both define some of them, and each must get its own.
template <at::ScalarType T>
__attribute__((visibility("hidden"))) const KernelTable* kernels();
template <>
__attribute__((visibility("hidden"))) const KernelTable* kernels<at::ScalarType::Float>();
template <>
__attribute__((visibility("hidden"))) const KernelTable* kernels<at::ScalarType::Double>();
template <>
__attribute__((visibility("hidden"))) const KernelTable* kernels<at::ScalarType::BFloat16>();
template <>
__attribute__((visibility("hidden"))) const KernelTable* kernels<at::ScalarType::Half>();
// fastnn._C_avx512's bfloat16 kernels built for AVX512-BF16 (avx512/
// batch_norm_cpu_bfloat16_avx512bf16.cpp), where the compiler can build them: GCC 10 or newer,
// whose `#pragma GCC target` that file uses.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10 && defined(__AVX512F__)
#define FASTNN_HAVE_AVX512BF16_KERNELS 1
__attribute__((visibility("hidden"))) const KernelTable* kernels_bfloat16_avx512bf16();
#endif

}  // namespace cpu
}  // namespace fastnn
