#include "batch_norm_common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

namespace fastnn {

at::MemoryFormat output_memory_format(const at::Tensor& input) {
  return input.suggest_memory_format();
}

BNShape bn_shape(const at::Tensor& input) {
  BNShape s;
  s.N = input.size(0);
  s.C = input.size(1);
  s.S = 1;
  for (int64_t d = 2; d < input.dim(); ++d) s.S *= input.size(d);
  s.format = output_memory_format(input);
  s.channels_last = input.dim() == 2 || s.format != at::MemoryFormat::Contiguous;
  return s;
}

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK_VALUE(input.dim() >= 2, op, ": input must have at least 2 dimensions (N, C, ...), got ",
                    input.dim(), "-D input of size ", input.sizes());
  const auto t = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(
      t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
      ": input must be float32, float64, float16 or bfloat16, got ", t);
}

void check_channel_tensor(const char* op, const char* arg, const at::Tensor& input,
                          const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return;
  const at::Tensor& p = *t;
  TORCH_CHECK(p.device() == input.device(), op, ": ", arg, " is on ", p.device(),
              " but input is on ", input.device());
  TORCH_CHECK(p.dim() == 1 && p.size(0) == input.size(1), op, ": ", arg,
              " must be a 1-D tensor with one element per channel (", input.size(1),
              "), got size ", p.sizes());
  const auto it = input.scalar_type();
  const bool reduced = it == at::kHalf || it == at::kBFloat16;
  TORCH_CHECK(p.scalar_type() == it || (reduced && p.scalar_type() == at::kFloat), op, ": ", arg,
              " has dtype ", p.scalar_type(), " but input has dtype ", it, " (", arg,
              " must have the input's dtype", reduced ? ", or float32" : "", ")");
}

void check_same_shape(const char* op, const char* arg, const at::Tensor& input,
                      const at::Tensor& t) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", arg, " is on ", t.device(),
              " but input is on ", input.device());
  TORCH_CHECK(t.sizes() == input.sizes(), op, ": ", arg, " must have the input's size ",
              input.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", arg, " has dtype ",
              t.scalar_type(), " but input has dtype ", input.scalar_type());
}

void check_stat_tensor(const char* op, const char* arg, const at::Tensor& input,
                       const at::Tensor& t) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", arg, " is on ", t.device(),
              " but input is on ", input.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == input.size(1), op, ": ", arg,
              " must be a 1-D tensor with one element per channel (", input.size(1),
              "), got size ", t.sizes());
  TORCH_CHECK(t.scalar_type() == accumulate_type(input.scalar_type()), op, ": ", arg,
              " must have dtype ", accumulate_type(input.scalar_type()), ", got ",
              t.scalar_type());
}

// The checks both forward ops make: input, the per-channel tensors, the residual.
static void check_forward_args(const char* op, const at::Tensor& input,
                               const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var,
                               const c10::optional<at::Tensor>& residual) {
  check_input(op, input);
  check_channel_tensor(op, "weight", input, weight);
  check_channel_tensor(op, "bias", input, bias);
  check_channel_tensor(op, "running_mean", input, running_mean);
  check_channel_tensor(op, "running_var", input, running_var);
  if (residual.has_value() && residual->defined()) check_same_shape(op, "residual", input, *residual);
}

void check_train_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& running_mean,
                      const c10::optional<at::Tensor>& running_var, double momentum, double eps,
                      const c10::optional<at::Tensor>& residual) {
  check_forward_args("fastnn.batch_norm_train", input, weight, bias, running_mean, running_var,
                     residual);
  // Written as torch's Python check is (eps <= 0 rejected), so that a NaN eps passes as there.
  TORCH_CHECK_VALUE(!(eps <= 0.0), "batch_norm eps must be positive during training, but got ",
                    eps);
  if (input.numel() > 0) {
    const int64_t per_channel = input.numel() / input.size(1);
    TORCH_CHECK_VALUE(per_channel > 1,
                      "Expected more than 1 value per channel when training, got input size ",
                      input.sizes());
  }
  (void)momentum;
}

void check_eval_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                     const at::Tensor& running_var, double eps,
                     const c10::optional<at::Tensor>& residual) {
  check_forward_args("fastnn.batch_norm_eval", input, weight, bias, running_mean, running_var,
                     residual);
  TORCH_CHECK_VALUE(!(eps < 0.0), "batch_norm eps must be non-negative, but got ", eps);
}

void check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                         const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& output, const at::Tensor& mean,
                         const at::Tensor& invstd, bool relu) {
  check_grad_args("fastnn.batch_norm_backward", grad_output, input, weight, output, mean, invstd,
                  relu);
}

void check_grad_args(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                     const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& output, const at::Tensor& mean,
                     const at::Tensor& invstd, bool relu) {
  check_input(op, input);
  check_same_shape(op, "grad_output", input, grad_output);
  check_channel_tensor(op, "weight", input, weight);
  check_stat_tensor(op, "mean", input, mean);
  check_stat_tensor(op, "invstd", input, invstd);
  if (relu) {
    TORCH_CHECK(output.has_value() && output->defined(), op,
                ": output (the forward's result) is required when relu=True");
    check_same_shape(op, "output", input, *output);
  }
}

void check_dual_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& running_mean,
                     const c10::optional<at::Tensor>& running_var, const at::Tensor& input2,
                     const c10::optional<at::Tensor>& weight2,
                     const c10::optional<at::Tensor>& bias2,
                     const c10::optional<at::Tensor>& running_mean2,
                     const c10::optional<at::Tensor>& running_var2, bool training, double eps,
                     double eps2) {
  const char* op = "fastnn.batch_norm_dual";
  check_forward_args(op, input, weight, bias, running_mean, running_var, c10::nullopt);
  check_same_shape(op, "input2", input, input2);
  check_channel_tensor(op, "weight2", input, weight2);
  check_channel_tensor(op, "bias2", input, bias2);
  check_channel_tensor(op, "running_mean2", input, running_mean2);
  check_channel_tensor(op, "running_var2", input, running_var2);
  if (training) {
    TORCH_CHECK_VALUE(!(eps <= 0.0) && !(eps2 <= 0.0),
                      "batch_norm eps must be positive during training, but got ",
                      eps <= 0.0 ? eps : eps2);
    if (input.numel() > 0) {
      TORCH_CHECK_VALUE(input.numel() / input.size(1) > 1,
                        "Expected more than 1 value per channel when training, got input size ",
                        input.sizes());
    }
  } else {
    const bool stats = running_mean.has_value() && running_mean->defined() &&
                       running_var.has_value() && running_var->defined() &&
                       running_mean2.has_value() && running_mean2->defined() &&
                       running_var2.has_value() && running_var2->defined();
    TORCH_CHECK(stats, op, ": running statistics of both batch norms must be defined in "
                "evaluation mode");
    TORCH_CHECK_VALUE(!(eps < 0.0) && !(eps2 < 0.0),
                      "batch_norm eps must be non-negative, but got ", eps < 0.0 ? eps : eps2);
  }
}

at::Tensor check_cat_inputs(const char* op, at::TensorList inputs) {
  TORCH_CHECK_VALUE(!inputs.empty(), op, ": inputs must hold at least one tensor");
  const at::Tensor& first = inputs[0];
  std::vector<int64_t> sizes = first.sizes().vec();
  int64_t channels = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor& t = inputs[i];
    check_input(op, t);
    TORCH_CHECK_VALUE(t.dim() == first.dim(), op, ": inputs[", i, "] has ", t.dim(),
                      " dimensions but inputs[0] has ", first.dim());
    TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), op, ": inputs[", i, "] is ",
                     t.scalar_type(), " but inputs[0] is ", first.scalar_type());
    TORCH_CHECK(t.device() == first.device(), op, ": inputs[", i, "] is on ", t.device(),
                " but inputs[0] is on ", first.device());
    for (int64_t d = 0; d < t.dim(); ++d) {
      TORCH_CHECK_VALUE(d == 1 || t.size(d) == first.size(d), op, ": inputs[", i, "] has size ",
                        t.sizes(), ", which does not match inputs[0] (", first.sizes(),
                        ") outside dimension 1");
    }
    channels += t.size(1);
  }
  sizes[1] = channels;
  return at::empty({}, first.options()).expand(sizes);
}

at::MemoryFormat cat_memory_format(at::TensorList inputs) {
  c10::optional<at::MemoryFormat> format;
  for (const at::Tensor& t : inputs) {
    const at::MemoryFormat f = t.suggest_memory_format();
    if (f == at::MemoryFormat::Contiguous || (format.has_value() && *format != f)) {
      return at::MemoryFormat::Contiguous;
    }
    format = f;
  }
  return format.value_or(at::MemoryFormat::Contiguous);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_batch_train(const at::Tensor& input) {
  const auto fmt = output_memory_format(input);
  auto stat_opts = input.options().dtype(accumulate_type(input.scalar_type()));
  return {at::empty(input.sizes(), input.options().memory_format(fmt)),
          at::zeros({input.size(1)}, stat_opts), at::zeros({input.size(1)}, stat_opts)};
}

}  // namespace fastnn
