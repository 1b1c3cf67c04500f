// CUDA batch_norm_backward: one reduction pass (sum g, sum g * (x - mean), with the masked
// gradient written to grad_residual and, in eval, dx written in the same pass), a finalize kernel
// (grad_weight, grad_bias, dx coefficients), and in training an elementwise dx pass. The training
// backward in parts reuses them: batch_norm_backward_reduce is the reduction and the finalize,
// batch_norm_backward_elemt the dx pass with coefficients from given reductions. Host code only;
// the launches are in batch_norm_backward.cuh, the kernels in batch_norm_kernels.cuh.
#include "batch_norm_backward.cuh"

namespace fastnn {
namespace cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& output, const at::Tensor& mean, const at::Tensor& invstd,
    bool training, bool relu, bool residual_grad, const c10::optional<at::Tensor>& relu_mask) {
  check_backward_args(grad_output, input, weight, output, mean, invstd, relu);
  TORCH_CHECK(input.is_cuda(), "fastnn.batch_norm_backward: input must be a CUDA tensor, got ",
              input.device());
  uint8_t* fwd_mask = checked_relu_mask("fastnn.batch_norm_backward", relu_mask, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const BNShape shape = bn_shape(input);
  const at::TensorOptions fmt_options = input.options().memory_format(shape.format);
  const at::ScalarType acc = accumulate_type(input.scalar_type());
  const at::TensorOptions stat_options = input.options().dtype(acc);
  at::Tensor grad_input = at::empty(input.sizes(), fmt_options);
  at::Tensor grad_residual =
      residual_grad ? at::empty(input.sizes(), fmt_options) : at::empty({0}, input.options());
  if (input.numel() == 0) {
    return {grad_input, at::zeros({shape.C}, stat_options), at::zeros({shape.C}, stat_options),
            grad_residual};
  }
  at::Tensor grad_weight = at::empty({shape.C}, stat_options);
  at::Tensor grad_bias = at::empty({shape.C}, stat_options);

  const BackwardInputs in(grad_output, input, output, relu, mean, invstd);
  const int64_t count = shape.reduce_size();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fastnn_batch_norm_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    BackwardArgs<scalar_t, acc_t> a = in.args<scalar_t, acc_t>();
    a.weight = channel_param(weight, acc);
    a.gr = residual_grad ? grad_residual.data_ptr<scalar_t>() : nullptr;
    a.dx = grad_input.data_ptr<scalar_t>();
    a.grad_weight = grad_weight.data_ptr<acc_t>();
    a.grad_bias = grad_bias.data_ptr<acc_t>();
    a.inv_count = static_cast<acc_t>(1.0 / static_cast<double>(count));
    a.stat_options = stat_options;
    a.fwd_mask = fwd_mask;
    backward_dispatch<false>(a, SecondInput<scalar_t, acc_t>{}, relu, residual_grad, training);
  });
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_reduce_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const c10::optional<at::Tensor>& output,
    const at::Tensor& mean, const at::Tensor& invstd, bool relu, bool residual_grad) {
  constexpr const char* kOp = "fastnn.batch_norm_backward_reduce";
  check_grad_args(kOp, grad_output, input, c10::nullopt, output, mean, invstd, relu);
  TORCH_CHECK(input.is_cuda(), kOp, ": input must be a CUDA tensor, got ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const BNShape shape = bn_shape(input);
  const at::ScalarType acc = accumulate_type(input.scalar_type());
  const at::TensorOptions stat_options = input.options().dtype(acc);
  at::Tensor grad_residual = residual_grad
                                 ? at::empty(input.sizes(),
                                             input.options().memory_format(shape.format))
                                 : at::empty({0}, input.options());
  if (input.numel() == 0) {
    return {at::zeros({shape.C}, stat_options), at::zeros({shape.C}, stat_options),
            grad_residual};
  }
  at::Tensor sum_dy = at::empty({shape.C}, stat_options);
  at::Tensor sum_dy_xhat = at::empty({shape.C}, stat_options);

  const BackwardInputs in(grad_output, input, output, relu, mean, invstd);
  const KernelLayout& layout = in.layout;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fastnn_batch_norm_backward_reduce_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    BackwardArgs<scalar_t, acc_t> a = in.args<scalar_t, acc_t>();
    a.gr = residual_grad ? grad_residual.data_ptr<scalar_t>() : nullptr;
    a.grad_weight = sum_dy_xhat.data_ptr<acc_t>();
    a.grad_bias = sum_dy.data_ptr<acc_t>();
    a.stat_options = stat_options;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = use_vectors(layout, kVec, {a.go, a.x, a.out, a.gr});
    FASTNN_VEC_SWITCH(vec, kVec, V, [&] {
      FASTNN_BOOL_SWITCH(relu, RELU, [&] {
        FASTNN_BOOL_SWITCH(residual_grad, WRITE_GR, [&] {
          reduce_only<scalar_t, acc_t, V, RELU, WRITE_GR>(a);
        });
      });
    });
  });
  return {sum_dy, sum_dy_xhat, grad_residual};
}

at::Tensor batch_norm_backward_elemt_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                          const c10::optional<at::Tensor>& weight,
                                          const c10::optional<at::Tensor>& output,
                                          const at::Tensor& mean, const at::Tensor& invstd,
                                          const at::Tensor& mean_dy,
                                          const at::Tensor& mean_dy_xhat, bool relu) {
  constexpr const char* kOp = "fastnn.batch_norm_backward_elemt";
  check_grad_args(kOp, grad_output, input, weight, output, mean, invstd, relu);
  check_stat_tensor(kOp, "mean_dy", input, mean_dy);
  check_stat_tensor(kOp, "mean_dy_xhat", input, mean_dy_xhat);
  TORCH_CHECK(input.is_cuda(), kOp, ": input must be a CUDA tensor, got ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const BNShape shape = bn_shape(input);
  at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(shape.format));
  if (input.numel() == 0) return grad_input;

  const at::ScalarType acc = accumulate_type(input.scalar_type());
  const BackwardInputs in(grad_output, input, output, relu, mean, invstd);
  const KernelLayout& layout = in.layout;
  const at::Tensor mean_dy_c = mean_dy.contiguous();
  const at::Tensor mean_dy_xhat_c = mean_dy_xhat.contiguous();
  at::Tensor coef = at::empty({3 * shape.C}, input.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fastnn_batch_norm_backward_elemt_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    constexpr int kThreadsPerChannelBlock = 256;
    bn_elemt_coef_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(ceil_div(shape.C, kThreadsPerChannelBlock)),
           kThreadsPerChannelBlock, 0, stream>>>(
            in.invstd.data_ptr<acc_t>(), channel_param(weight, acc), mean_dy_c.data_ptr<acc_t>(),
            mean_dy_xhat_c.data_ptr<acc_t>(), shape.C, coef.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    BackwardArgs<scalar_t, acc_t> a = in.args<scalar_t, acc_t>();
    a.dx = grad_input.data_ptr<scalar_t>();
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = use_vectors(layout, kVec, {a.go, a.x, a.out, a.dx});
    FASTNN_VEC_SWITCH(vec, kVec, V, [&] {
      FASTNN_BOOL_SWITCH(relu, MASK, [&] {
        dx_only<scalar_t, acc_t, V, MASK>(a, coef.data_ptr<acc_t>());
      });
    });
  });
  return grad_input;
}

}  // namespace cuda
}  // namespace fastnn
