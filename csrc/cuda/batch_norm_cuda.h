// The CUDA implementations of the fastnn ops (schemas in csrc/fastnn.cpp), registered in
// batch_norm_cuda.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace fastnn {
namespace cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum, double eps,
    const c10::optional<at::Tensor>& residual, bool relu);

// batch_norm_train with the output's ReLU mask (see batch_norm_kernels.cuh) as a fourth output.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_train_masked_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum, double eps,
    const c10::optional<at::Tensor>& residual, bool relu);

at::Tensor batch_norm_eval_cuda(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias,
                                const at::Tensor& running_mean, const at::Tensor& running_var,
                                double eps, const c10::optional<at::Tensor>& residual, bool relu);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& output, const at::Tensor& mean, const at::Tensor& invstd,
    bool training, bool relu, bool residual_grad,
    const c10::optional<at::Tensor>& relu_mask = c10::nullopt);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_dual_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const at::Tensor& input2,
    const c10::optional<at::Tensor>& weight2, const c10::optional<at::Tensor>& bias2,
    const c10::optional<at::Tensor>& running_mean2, const c10::optional<at::Tensor>& running_var2,
    bool training, double momentum, double eps, double momentum2, double eps2, bool relu);

// batch_norm_dual with the output's ReLU mask (training with relu) as a sixth output.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
batch_norm_dual_masked_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const at::Tensor& input2,
    const c10::optional<at::Tensor>& weight2, const c10::optional<at::Tensor>& bias2,
    const c10::optional<at::Tensor>& running_mean2, const c10::optional<at::Tensor>& running_var2,
    bool training, double momentum, double eps, double momentum2, double eps2, bool relu);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
batch_norm_dual_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                              const c10::optional<at::Tensor>& weight, const at::Tensor& input2,
                              const c10::optional<at::Tensor>& weight2,
                              const c10::optional<at::Tensor>& output, const at::Tensor& mean,
                              const at::Tensor& invstd, const at::Tensor& mean2,
                              const at::Tensor& invstd2, bool training, bool relu,
                              const c10::optional<at::Tensor>& relu_mask = c10::nullopt);

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input);

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_cat_with_stats_cuda(
    at::TensorList inputs, const at::Tensor& mean, const at::Tensor& var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    double momentum, double eps, bool relu);

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_with_stats_cuda(
    const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    double momentum, double eps, const c10::optional<at::Tensor>& residual, bool relu);

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_reduce_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const c10::optional<at::Tensor>& output,
    const at::Tensor& mean, const at::Tensor& invstd, bool relu, bool residual_grad);

at::Tensor batch_norm_backward_elemt_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                          const c10::optional<at::Tensor>& weight,
                                          const c10::optional<at::Tensor>& output,
                                          const at::Tensor& mean, const at::Tensor& invstd,
                                          const at::Tensor& mean_dy,
                                          const at::Tensor& mean_dy_xhat, bool relu);

}  // namespace cuda
}  // namespace fastnn
