// CUDA batch_norm_dual_backward, the backward of relu(bn(x) + bn2(z)): one reduction pass over
// g, x and z (three sums per channel), a finalize of both batch norms, and in training one dx pass
// writing dx and dz from the same g. Host code only; the launches are in batch_norm_backward.cuh,
// the kernels in batch_norm_kernels.cuh.
#include "batch_norm_backward.cuh"

namespace fastnn {
namespace cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
batch_norm_dual_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                              const c10::optional<at::Tensor>& weight, const at::Tensor& input2,
                              const c10::optional<at::Tensor>& weight2,
                              const c10::optional<at::Tensor>& output, const at::Tensor& mean,
                              const at::Tensor& invstd, const at::Tensor& mean2,
                              const at::Tensor& invstd2, bool training, bool relu,
                              const c10::optional<at::Tensor>& relu_mask) {
  constexpr const char* kOp = "fastnn.batch_norm_dual_backward";
  check_grad_args(kOp, grad_output, input, weight, output, mean, invstd, relu);
  uint8_t* fwd_mask = checked_relu_mask(kOp, relu_mask, input);
  check_same_shape(kOp, "input2", input, input2);
  check_channel_tensor(kOp, "weight2", input, weight2);
  check_stat_tensor(kOp, "mean2", input, mean2);
  check_stat_tensor(kOp, "invstd2", input, invstd2);
  TORCH_CHECK(input.is_cuda(), kOp, ": input must be a CUDA tensor, got ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const BNShape shape = bn_shape(input);
  const at::TensorOptions fmt_options = input.options().memory_format(shape.format);
  const at::ScalarType acc = accumulate_type(input.scalar_type());
  const at::TensorOptions stat_options = input.options().dtype(acc);
  at::Tensor grad_input = at::empty(input.sizes(), fmt_options);
  at::Tensor grad_input2 = at::empty(input.sizes(), fmt_options);
  const int64_t C = shape.C;
  if (input.numel() == 0) {
    return {grad_input, at::zeros({C}, stat_options), at::zeros({C}, stat_options), grad_input2,
            at::zeros({C}, stat_options), at::zeros({C}, stat_options)};
  }
  at::Tensor grad_weight = at::empty({C}, stat_options), grad_bias = at::empty({C}, stat_options);
  at::Tensor grad_weight2 = at::empty({C}, stat_options);
  at::Tensor grad_bias2 = at::empty({C}, stat_options);

  const BackwardInputs in(grad_output, input, output, relu, mean, invstd);
  const at::Tensor z = input2.contiguous(shape.format);
  const at::Tensor mean2_c = mean2.contiguous(), invstd2_c = invstd2.contiguous();
  const int64_t count = shape.reduce_size();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fastnn_batch_norm_dual_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    BackwardArgs<scalar_t, acc_t> a = in.args<scalar_t, acc_t>();
    a.weight = channel_param(weight, acc);
    a.dx = grad_input.data_ptr<scalar_t>();
    a.grad_weight = grad_weight.data_ptr<acc_t>();
    a.grad_bias = grad_bias.data_ptr<acc_t>();
    a.inv_count = static_cast<acc_t>(1.0 / static_cast<double>(count));
    a.stat_options = stat_options;
    SecondInput<scalar_t, acc_t> second{};
    second.z = z.data_ptr<scalar_t>();
    second.mean = mean2_c.data_ptr<acc_t>();
    second.invstd = invstd2_c.data_ptr<acc_t>();
    second.weight = channel_param(weight2, acc);
    second.dz = grad_input2.data_ptr<scalar_t>();
    second.grad_weight = grad_weight2.data_ptr<acc_t>();
    second.grad_bias = grad_bias2.data_ptr<acc_t>();
    a.fwd_mask = fwd_mask;
    backward_dispatch<true>(a, second, relu, false, training);
  });
  return {grad_input, grad_weight, grad_bias, grad_input2, grad_weight2, grad_bias2};
}

}  // namespace cuda
}  // namespace fastnn
