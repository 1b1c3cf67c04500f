// Autograd of the forward ops, in C++ (one kernel at the Autograd key for every device).
//
// Each forward op's Autograd kernel applies a torch::autograd::Function whose forward runs the op
// below autograd and whose backward is the registered batch_norm_backward (or
// batch_norm_dual_backward) op. A call that records no graph goes straight below autograd. Under
// create_graph=True (double backward) the first derivatives are instead those of the forward
// recomputed from differentiable ATen ops, so they can be differentiated again; that path follows
// fastnn/reference.py.
//
// Being C++, the autograd costs about what PyTorch's own batch norm spends on it, and
// torch.compile traces it like any other C++ autograd kernel.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "batch_norm_common.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cstdlib>
#include <initializer_list>
#include <string>
#include <vector>

namespace fastnn {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<Tensor>;

using Stats3 = std::tuple<Tensor, Tensor, Tensor>;
using TrainSig = Stats3(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                        const OptTensor&, double, double, const OptTensor&, bool);
using TrainMaskedSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, double,
    double, const OptTensor&, bool);
using TrainWithStatsSig = Stats3(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                 const OptTensor&, const OptTensor&, const OptTensor&, double,
                                 double, const OptTensor&, bool);
using CatSig = Stats3(at::TensorList, const Tensor&, const Tensor&, const OptTensor&,
                      const OptTensor&, const OptTensor&, const OptTensor&, double, double, bool);
using EvalSig = Tensor(const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                       const Tensor&, double, const OptTensor&, bool);
using DualSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool,
    double, double, double, double, bool);
using DualMaskedSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool,
    double, double, double, double, bool);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
    const Tensor&, bool, bool, bool, const OptTensor&);
using DualBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&,
    const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, bool,
    const OptTensor&);

// The typed handle of each op, looked up once.
#define FASTNN_OP(fn, sig, name)                                                        \
  const c10::TypedOperatorHandle<sig>& fn() {                                           \
    static const auto handle =                                                          \
        c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<sig>();         \
    return handle;                                                                      \
  }
FASTNN_OP(train_op, TrainSig, "fastnn::batch_norm_train")
FASTNN_OP(train_masked_op, TrainMaskedSig, "fastnn::batch_norm_train_masked")
FASTNN_OP(train_with_stats_op, TrainWithStatsSig, "fastnn::batch_norm_train_with_stats")
FASTNN_OP(cat_op, CatSig, "fastnn::batch_norm_cat_with_stats")
FASTNN_OP(eval_op, EvalSig, "fastnn::batch_norm_eval")
FASTNN_OP(dual_op, DualSig, "fastnn::batch_norm_dual")
FASTNN_OP(dual_masked_op, DualMaskedSig, "fastnn::batch_norm_dual_masked")
FASTNN_OP(backward_op, BackwardSig, "fastnn::batch_norm_backward")
FASTNN_OP(dual_backward_op, DualBackwardSig, "fastnn::batch_norm_dual_backward")
#undef FASTNN_OP

// Whether a recorded forward with relu asks for its output's ReLU mask (batch_norm_train_masked,
// batch_norm_dual_masked), so that the backward reads 1/16 of the output's bytes (CUDA; on CPU
// a bit per element) instead of the output. The mask is kept until the backward:
// FASTNN_RELU_MASK=0 (read once) keeps only what PyTorch's own batch norm and ReLU keep, and
// the backward reads the output.
bool relu_mask_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("FASTNN_RELU_MASK");
    return v == nullptr || std::string(v) != "0";
  }();
  return enabled;
}

bool requires_grad(const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); }
bool requires_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }

// True when a call records a graph: grad mode on and a differentiable argument requiring grad.
bool records_graph(std::initializer_list<bool> flags) {
  if (!at::GradMode::is_enabled()) return false;
  for (bool r : flags) {
    if (r) return true;
  }
  return false;
}

Tensor value_or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
OptTensor as_optional(const Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

// Which of up to 64 differentiable arguments need a gradient, recorded at the forward (as
// autograd.Function's needs_input_grad is).
int64_t needs_mask(std::initializer_list<bool> flags) {
  int64_t mask = 0, bit = 1;
  for (bool r : flags) {
    if (r) mask |= bit;
    bit <<= 1;
  }
  return mask;
}
bool needs(const AutogradContext* ctx, int index) {
  return (ctx->saved_data.at("needs").toInt() >> index) & 1;
}

// A parameter gradient, computed in the accumulation dtype, in the parameter's dtype.
Tensor param_grad(const Tensor& grad, const Tensor& param, bool need) {
  if (!need || !param.defined()) return Tensor();
  return grad.scalar_type() == param.scalar_type() ? grad : grad.to(param.scalar_type());
}

// ------------------------------------------------------------------------------------------
// The forward recomputed from differentiable ATen ops (fastnn/reference.py), for double backward.

at::ScalarType accumulate_dtype(const Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Tensor per_channel(const Tensor& t, int64_t ndim) {
  std::vector<int64_t> shape(ndim, 1);
  shape[1] = -1;
  return t.reshape(shape);
}

std::vector<int64_t> reduce_dims(int64_t ndim) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < ndim; ++d) dims.push_back(d);
  return dims;
}

// [relu]((x - mean) * invstd * weight + bias [+ residual]) in x's dtype, cast to out_dtype.
Tensor normalize_affine(const Tensor& x, const Tensor& mean, const Tensor& invstd,
                        const Tensor& weight, const Tensor& bias, const Tensor& residual, bool relu,
                        at::ScalarType out_dtype) {
  const int64_t nd = x.dim();
  Tensor y = (x - per_channel(mean, nd)) * per_channel(invstd, nd);
  if (weight.defined()) y = y * per_channel(weight.to(x.scalar_type()), nd);
  if (bias.defined()) y = y + per_channel(bias.to(x.scalar_type()), nd);
  if (residual.defined()) y = y + residual.to(x.scalar_type());
  if (relu) y = at::relu(y);
  return y.to(out_dtype);
}

// (mean, biased var) of x per channel (zeros for an empty batch, as the kernels give).
std::pair<Tensor, Tensor> mean_var(const Tensor& x) {
  if (x.numel() == 0) {
    Tensor zeros = at::zeros({x.size(1)}, x.options());
    return {zeros, zeros};
  }
  const auto dims = reduce_dims(x.dim());
  Tensor mean = x.mean(dims);
  Tensor var = (x - per_channel(mean, x.dim())).square().mean(dims);
  return {mean, var};
}

// (mean, invstd) of x with batch statistics (zeros for an empty batch, as the kernels give).
std::pair<Tensor, Tensor> batch_stats(const Tensor& x, double eps) {
  if (x.numel() == 0) return mean_var(x);
  auto [mean, var] = mean_var(x);
  return {mean, at::rsqrt(var + eps)};
}

// d(out)/d(each of `wrt`) . grad_output, differentiable (create_graph); undefined for the
// arguments not requiring grad.
variable_list differentiable_grads(const Tensor& out, const variable_list& wrt,
                                   const Tensor& grad_output) {
  variable_list wanted;
  for (const Tensor& t : wrt) {
    if (requires_grad(t)) wanted.push_back(t);
  }
  variable_list result(wrt.size());
  if (wanted.empty()) return result;
  variable_list grads = torch::autograd::grad({out}, wanted, {grad_output},
                                              /*retain_graph=*/true, /*create_graph=*/true,
                                              /*allow_unused=*/true);
  size_t k = 0;
  for (size_t i = 0; i < wrt.size(); ++i) {
    if (requires_grad(wrt[i])) result[i] = grads[k++];
  }
  return result;
}

// ------------------------------------------------------------------------------------------
// The single-input forward ops (train, train_with_stats, eval) share one backward.

struct SingleSaved {
  Tensor input, weight, bias, residual, output, mean, invstd;
};

// Saves what the backward reads. The output is kept only for the ReLU mask, and with it the
// mask a masked forward returned (`mask`, undefined when none).
void save_single(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                 const OptTensor& bias, const OptTensor& residual, const Tensor& output,
                 const Tensor& mean, const Tensor& invstd, bool training, bool relu, double eps,
                 const Tensor& mask = Tensor()) {
  ctx->saved_data["needs"] = needs_mask({requires_grad(input), requires_grad(weight),
                                         requires_grad(bias), requires_grad(residual)});
  ctx->saved_data["training"] = training;
  ctx->saved_data["relu"] = relu;
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["has_residual"] = residual.has_value() && residual->defined();
  ctx->save_for_backward({input, value_or_undefined(weight), value_or_undefined(bias),
                          value_or_undefined(residual), relu ? output : Tensor(), mean, invstd,
                          relu ? mask : Tensor()});
}

// (grad_input, grad_weight, grad_bias, grad_residual), undefined where not needed.
variable_list single_backward(AutogradContext* ctx, const Tensor& grad_output) {
  const variable_list saved = ctx->get_saved_variables();
  const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &residual = saved[3],
               &output = saved[4], &mean = saved[5], &invstd = saved[6], &mask = saved[7];
  const bool training = ctx->saved_data.at("training").toBool();
  const bool relu = ctx->saved_data.at("relu").toBool();
  if (at::GradMode::is_enabled()) {
    // create_graph=True: differentiate the recomputed forward.
    const auto acc = accumulate_dtype(input);
    const Tensor x = input.to(acc);
    Tensor out;
    if (training) {
      auto [m, s] = batch_stats(x, ctx->saved_data.at("eps").toDouble());
      out = normalize_affine(x, m, s, weight, bias, residual, relu, input.scalar_type());
    } else {
      out = normalize_affine(x, mean, invstd, weight, bias, residual, relu, input.scalar_type());
    }
    return differentiable_grads(out, {input, weight, bias, residual}, grad_output);
  }
  const bool need_residual = needs(ctx, 3) && ctx->saved_data.at("has_residual").toBool();
  Tensor gi, gw, gb, gr;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(gi, gw, gb, gr) = backward_op().call(grad_output, input, as_optional(weight),
                                                  as_optional(output), mean, invstd, training,
                                                  relu, need_residual, as_optional(mask));
  }
  return {needs(ctx, 0) ? gi : Tensor(), param_grad(gw, weight, needs(ctx, 1)),
          param_grad(gb, bias, needs(ctx, 2)), need_residual ? gr : Tensor()};
}

class TrainFunction : public torch::autograd::Function<TrainFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean,
                               const OptTensor& running_var, double momentum, double eps,
                               const OptTensor& residual, bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // With relu the forward also writes the output's ReLU mask for the backward (CUDA: 1/16 of
    // the output's bytes; CPU: a bit per element), read in place of the output.
    Tensor out, mean, invstd, mask;
    if (relu && relu_mask_enabled()) {
      std::tie(out, mean, invstd, mask) = train_masked_op().call(
          input, weight, bias, running_mean, running_var, momentum, eps, residual, relu);
    } else {
      std::tie(out, mean, invstd) = train_op().call(input, weight, bias, running_mean,
                                                    running_var, momentum, eps, residual, relu);
    }
    save_single(ctx, input, weight, bias, residual, out, mean, invstd, true, relu, eps, mask);
    ctx->mark_non_differentiable({mean, invstd});
    return {out, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list g = single_backward(ctx, grads[0]);
    // input, weight, bias, running_mean, running_var, momentum, eps, residual, relu
    return {g[0], g[1], g[2], Tensor(), Tensor(), Tensor(), Tensor(), g[3], Tensor()};
  }
};

class TrainWithStatsFunction : public torch::autograd::Function<TrainWithStatsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& mean,
                               const Tensor& var, const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& running_mean, const OptTensor& running_var,
                               double momentum, double eps, const OptTensor& residual,
                               bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, save_mean, invstd] = train_with_stats_op().call(
        input, mean, var, weight, bias, running_mean, running_var, momentum, eps, residual, relu);
    save_single(ctx, input, weight, bias, residual, out, save_mean, invstd, true, relu, eps);
    ctx->mark_non_differentiable({save_mean, invstd});
    return {out, save_mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // mean and var are functions of the input that the training backward already accounts for:
    // they get no gradient of their own.
    const variable_list g = single_backward(ctx, grads[0]);
    return {g[0],     Tensor(), Tensor(), g[1],     g[2], Tensor(),
            Tensor(), Tensor(), Tensor(), g[3], Tensor()};
  }
};

class EvalFunction : public torch::autograd::Function<EvalFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const Tensor& running_mean,
                               const Tensor& running_var, double eps, const OptTensor& residual,
                               bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = eval_op().call(input, weight, bias, running_mean, running_var, eps, residual,
                                relu);
    // The statistics this forward normalized with, copied: the backward sees them even if the
    // running statistics change in between.
    const auto acc = accumulate_dtype(input);
    Tensor mean = running_mean.to(acc, /*non_blocking=*/false, /*copy=*/true);
    Tensor invstd = at::rsqrt(running_var.to(acc, /*non_blocking=*/false, /*copy=*/true) + eps);
    save_single(ctx, input, weight, bias, residual, out, mean, invstd, false, relu, eps);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list g = single_backward(ctx, grads[0]);
    // input, weight, bias, running_mean, running_var, eps, residual, relu
    return {g[0], g[1], g[2], Tensor(), Tensor(), Tensor(), g[3], Tensor()};
  }
};

// ------------------------------------------------------------------------------------------
// batch_norm_dual: [relu](bn(input) + bn2(input2)).

class DualFunction : public torch::autograd::Function<DualFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean,
                               const OptTensor& running_var, const Tensor& input2,
                               const OptTensor& weight2, const OptTensor& bias2,
                               const OptTensor& running_mean2, const OptTensor& running_var2,
                               bool training, double momentum, double eps, double momentum2,
                               double eps2, bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out, mean, invstd, mean2, invstd2, mask;
    if (relu && training && relu_mask_enabled()) {  // the output's ReLU mask, as TrainFunction's
      std::tie(out, mean, invstd, mean2, invstd2, mask) = dual_masked_op().call(
          input, weight, bias, running_mean, running_var, input2, weight2, bias2, running_mean2,
          running_var2, training, momentum, eps, momentum2, eps2, relu);
    } else {
      std::tie(out, mean, invstd, mean2, invstd2) =
          dual_op().call(input, weight, bias, running_mean, running_var, input2, weight2, bias2,
                         running_mean2, running_var2, training, momentum, eps, momentum2, eps2,
                         relu);
    }
    ctx->saved_data["needs"] =
        needs_mask({requires_grad(input), requires_grad(weight), requires_grad(bias),
                    requires_grad(input2), requires_grad(weight2), requires_grad(bias2)});
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["eps2"] = eps2;
    ctx->save_for_backward({input, value_or_undefined(weight), value_or_undefined(bias), input2,
                            value_or_undefined(weight2), value_or_undefined(bias2),
                            relu ? out : Tensor(), mean, invstd, mean2, invstd2, mask});
    ctx->mark_non_differentiable({mean, invstd, mean2, invstd2});
    return {out, mean, invstd, mean2, invstd2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list g = grads_of_inputs(ctx, grads[0]);
    // input, weight, bias, running_mean, running_var, input2, weight2, bias2, running_mean2,
    // running_var2, then six non-tensor arguments.
    return {g[0],     g[1],     g[2],     Tensor(), Tensor(), g[3],     g[4],     g[5],
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }

 private:
  // (grad_input, grad_weight, grad_bias, grad_input2, grad_weight2, grad_bias2).
  static variable_list grads_of_inputs(AutogradContext* ctx, const Tensor& grad_output) {
    const variable_list s = ctx->get_saved_variables();
    const Tensor &input = s[0], &weight = s[1], &bias = s[2], &input2 = s[3], &weight2 = s[4],
                 &bias2 = s[5], &output = s[6], &mean = s[7], &invstd = s[8], &mean2 = s[9],
                 &invstd2 = s[10], &mask = s[11];
    const bool training = ctx->saved_data.at("training").toBool();
    const bool relu = ctx->saved_data.at("relu").toBool();
    if (at::GradMode::is_enabled()) {  // double backward: differentiate the recomputed forward
      const auto acc = accumulate_dtype(input);
      const Tensor x = input.to(acc), z = input2.to(acc);
      Tensor m = mean, is = invstd, m2 = mean2, is2 = invstd2;
      if (training) {
        std::tie(m, is) = batch_stats(x, ctx->saved_data.at("eps").toDouble());
        std::tie(m2, is2) = batch_stats(z, ctx->saved_data.at("eps2").toDouble());
      }
      const Tensor y2 = normalize_affine(z, m2, is2, weight2, bias2, Tensor(), false, acc);
      const Tensor out = normalize_affine(x, m, is, weight, bias, y2, relu, input.scalar_type());
      return differentiable_grads(out, {input, weight, bias, input2, weight2, bias2},
                                  grad_output);
    }
    const bool need_second = needs(ctx, 3) || needs(ctx, 4) || needs(ctx, 5);
    Tensor gx, gw, gb, gz, gw2, gb2;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      if (need_second && dual_backward_op().hasKernelForDispatchKey(
                             c10::computeDispatchKey(c10::nullopt, c10::nullopt,
                                                     input.device()))) {
        // One reduction pass and one element-wise pass over both inputs.
        std::tie(gx, gw, gb, gz, gw2, gb2) = dual_backward_op().call(
            grad_output, input, as_optional(weight), input2, as_optional(weight2),
            as_optional(output), mean, invstd, mean2, invstd2, training, relu,
            as_optional(mask));
      } else {
        Tensor masked;
        std::tie(gx, gw, gb, masked) =
            backward_op().call(grad_output, input, as_optional(weight), as_optional(output),
                               mean, invstd, training, relu, need_second && relu,
                               as_optional(mask));
        if (need_second) {
          const Tensor& g2 = relu ? masked : grad_output;
          std::tie(gz, gw2, gb2, std::ignore) =
              backward_op().call(g2, input2, as_optional(weight2), c10::nullopt, mean2,
                                 invstd2, training, false, false, c10::nullopt);
        }
      }
    }
    return {needs(ctx, 0) ? gx : Tensor(),     param_grad(gw, weight, needs(ctx, 1)),
            param_grad(gb, bias, needs(ctx, 2)),  needs(ctx, 3) ? gz : Tensor(),
            param_grad(gw2, weight2, needs(ctx, 4)), param_grad(gb2, bias2, needs(ctx, 5))};
  }
};

// ------------------------------------------------------------------------------------------
// batch_norm_cat_with_stats: the backward is the training backward of the concatenation, made
// for the call and freed with it; each input's gradient is its slice of the concatenation's.

class CatWithStatsFunction : public torch::autograd::Function<CatWithStatsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs, const Tensor& mean,
                               const Tensor& var, const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& running_mean, const OptTensor& running_var,
                               double momentum, double eps, bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, save_mean, invstd] = cat_op().call(inputs, mean, var, weight, bias, running_mean,
                                                  running_var, momentum, eps, relu);
    // Per input whether it needs a gradient, and its width along dim 1.
    std::vector<int64_t> need_inputs, widths;
    for (const Tensor& t : inputs) {
      need_inputs.push_back(requires_grad(t));
      widths.push_back(t.size(1));
    }
    ctx->saved_data["needs"] = needs_mask({requires_grad(weight), requires_grad(bias)});
    ctx->saved_data["need_inputs"] = need_inputs;
    ctx->saved_data["widths"] = widths;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["eps"] = eps;
    variable_list to_save{value_or_undefined(weight), value_or_undefined(bias),
                          relu ? out : Tensor(), save_mean, invstd};
    to_save.insert(to_save.end(), inputs.begin(), inputs.end());
    ctx->save_for_backward(std::move(to_save));
    ctx->mark_non_differentiable({save_mean, invstd});
    return {out, save_mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const Tensor &weight = s[0], &bias = s[1], &output = s[2], &mean = s[3], &invstd = s[4];
    const variable_list inputs(s.begin() + 5, s.end());
    const auto need_inputs = ctx->saved_data.at("need_inputs").toIntVector();
    const bool need_weight = needs(ctx, 0), need_bias = needs(ctx, 1);
    const bool relu = ctx->saved_data.at("relu").toBool();
    const Tensor& grad_output = grads[0];
    variable_list input_grads(inputs.size());
    Tensor gw, gb;
    if (at::GradMode::is_enabled()) {  // double backward: differentiate the recomputed forward
      const Tensor x = at::cat(inputs, 1);
      const Tensor xa = x.to(accumulate_dtype(x));
      auto [m, is] = batch_stats(xa, ctx->saved_data.at("eps").toDouble());
      const Tensor out = normalize_affine(xa, m, is, weight, bias, Tensor(), relu,
                                          x.scalar_type());
      variable_list wrt{weight, bias};
      wrt.insert(wrt.end(), inputs.begin(), inputs.end());
      const variable_list g = differentiable_grads(out, wrt, grad_output);
      gw = need_weight ? g[0] : Tensor();
      gb = need_bias ? g[1] : Tensor();
      for (size_t i = 0; i < inputs.size(); ++i) {
        if (need_inputs[i]) input_grads[i] = g[2 + i];
      }
    } else {
      Tensor gi, gw_acc, gb_acc;
      {
        at::AutoDispatchBelowADInplaceOrView guard;
        const Tensor x = at::cat(inputs, 1);
        std::tie(gi, gw_acc, gb_acc, std::ignore) =
            backward_op().call(grad_output, x, as_optional(weight), as_optional(output), mean,
                               invstd, true, relu, false, c10::nullopt);
      }
      const auto widths = ctx->saved_data.at("widths").toIntVector();
      const auto pieces = gi.split_with_sizes(widths, 1);
      for (size_t i = 0; i < inputs.size(); ++i) {
        if (need_inputs[i]) input_grads[i] = pieces[i];
      }
      gw = param_grad(gw_acc, weight, need_weight);
      gb = param_grad(gb_acc, bias, need_bias);
    }
    // inputs (one gradient each), mean, var, weight, bias, running_mean, running_var, momentum,
    // eps, relu
    variable_list result = std::move(input_grads);
    const variable_list rest{Tensor(), Tensor(), gw,       gb,      Tensor(),
                             Tensor(), Tensor(), Tensor(), Tensor()};
    result.insert(result.end(), rest.begin(), rest.end());
    return result;
  }
};

// ------------------------------------------------------------------------------------------
// Forward-mode AD and torch.func.
//
// A torch::autograd::Function has no forward-mode derivative and refuses torch.func's transforms.
// So when an argument carries a forward-mode tangent (torch.autograd.forward_ad, torch.func.jvp,
// jacfwd), or a call records a graph under a torch.func transform (grad, vjp, jacrev), the
// output is computed by the differentiable ATen ops above, which carry tangents and functorch's
// wrappers; the op itself runs below autograd only for what those ops do not give, the
// running-statistics update and the saved statistics. Under torch.vmap the ops' FuncTorchBatched
// kernels (below) compute everything with ATen ops, which have batching rules.

bool has_tangent(const Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
bool has_tangent(const OptTensor& t) { return t.has_value() && has_tangent(*t); }

bool under_functorch() {
  return c10::impl::tls_is_dispatch_key_included(
      c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

// True when a call must take the ATen path: see above.
bool composite_path(bool graph, std::initializer_list<bool> tangents) {
  if (graph && under_functorch()) return true;
  for (bool t : tangents) {
    if (t) return true;
  }
  return false;
}

// As torch's batch norm: with grad mode on, a running statistic that requires grad is refused
// (they are not differentiable), before anything changes.
void check_not_differentiable(const Tensor& t, const char* name) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && requires_grad(t)),
              "The function 'batch_norm' is not differentiable with respect to argument '", name,
              "'. This input cannot have requires_grad True.");
}
void check_not_differentiable(const OptTensor& t, const char* name) {
  if (t.has_value()) check_not_differentiable(*t, name);
}

// How a call of a single-input op (train, train_with_stats, eval) runs: `graph` when it records
// one, `composite` when it takes the ATen path.
struct Route {
  bool graph, composite;
};
Route single_route(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                   const OptTensor& residual) {
  const bool graph = records_graph({requires_grad(input), requires_grad(weight),
                                    requires_grad(bias), requires_grad(residual)});
  return {graph, composite_path(graph, {has_tangent(input), has_tangent(weight),
                                        has_tangent(bias), has_tangent(residual)})};
}

// The ATen path of a training op: the op below autograd updates the running statistics and
// gives the saved ones; `output` is the differentiable output.
template <typename Call>
Stats3 with_output(const Tensor& output, Call below) {
  Tensor mean, invstd;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(std::ignore, mean, invstd) = below();
  }
  return {output, mean, invstd};
}

// The training output from the input's own batch statistics, in the input's dtype unless
// `acc_out` asks for the accumulation dtype.
Tensor train_output(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                    double eps, const OptTensor& residual, bool relu, bool acc_out = false) {
  const auto acc = accumulate_dtype(input);
  const Tensor x = input.to(acc);
  auto [m, s] = batch_stats(x, eps);
  return normalize_affine(x, m, s, value_or_undefined(weight), value_or_undefined(bias),
                          value_or_undefined(residual), relu,
                          acc_out ? acc : input.scalar_type());
}

// The inference output from the running statistics (no derivative flows to them, as in torch).
Tensor eval_output(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                   const Tensor& running_mean, const Tensor& running_var, double eps,
                   const OptTensor& residual, bool relu, bool acc_out = false) {
  const auto acc = accumulate_dtype(input);
  const Tensor mean = running_mean.detach().to(acc);
  const Tensor invstd = at::rsqrt(running_var.detach().to(acc) + eps);
  return normalize_affine(input.to(acc), mean, invstd, value_or_undefined(weight),
                          value_or_undefined(bias), value_or_undefined(residual), relu,
                          acc_out ? acc : input.scalar_type());
}

// ------------------------------------------------------------------------------------------
// The Autograd kernels.

Stats3 train_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                      const OptTensor& running_mean, const OptTensor& running_var,
                      double momentum, double eps, const OptTensor& residual, bool relu) {
  check_not_differentiable(running_mean, "running_mean");
  check_not_differentiable(running_var, "running_var");
  const Route route = single_route(input, weight, bias, residual);
  if (route.composite) {
    return with_output(train_output(input, weight, bias, eps, residual, relu), [&] {
      return train_op().call(input, weight, bias, running_mean, running_var, momentum, eps,
                             residual, relu);
    });
  }
  if (!route.graph) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return train_op().call(input, weight, bias, running_mean, running_var, momentum, eps,
                           residual, relu);
  }
  const variable_list r = TrainFunction::apply(input, weight, bias, running_mean, running_var,
                                               momentum, eps, residual, relu);
  return {r[0], r[1], r[2]};
}

Stats3 train_with_stats_autograd(const Tensor& input, const Tensor& mean, const Tensor& var,
                                 const OptTensor& weight, const OptTensor& bias,
                                 const OptTensor& running_mean, const OptTensor& running_var,
                                 double momentum, double eps, const OptTensor& residual,
                                 bool relu) {
  check_not_differentiable(running_mean, "running_mean");
  check_not_differentiable(running_var, "running_var");
  const Route route = single_route(input, weight, bias, residual);
  if (route.composite) {
    // The given statistics are the input's own: the output is recomputed from the input.
    return with_output(train_output(input, weight, bias, eps, residual, relu), [&] {
      return train_with_stats_op().call(input, mean, var, weight, bias, running_mean,
                                        running_var, momentum, eps, residual, relu);
    });
  }
  if (!route.graph) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return train_with_stats_op().call(input, mean, var, weight, bias, running_mean, running_var,
                                      momentum, eps, residual, relu);
  }
  // The statistics are detached: no gradient flows to them (see the Function's backward).
  const variable_list r =
      TrainWithStatsFunction::apply(input, mean.detach(), var.detach(), weight, bias,
                                    running_mean, running_var, momentum, eps, residual, relu);
  return {r[0], r[1], r[2]};
}

Stats3 cat_autograd(at::TensorList inputs, const Tensor& mean, const Tensor& var,
                    const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                    const OptTensor& running_var, double momentum, double eps, bool relu) {
  check_not_differentiable(running_mean, "running_mean");
  check_not_differentiable(running_var, "running_var");
  bool any_input = false, any_tangent = false;
  for (const Tensor& t : inputs) {
    any_input = any_input || requires_grad(t);
    any_tangent = any_tangent || has_tangent(t);
  }
  const bool graph = records_graph({any_input, requires_grad(weight), requires_grad(bias)});
  if (composite_path(graph, {any_tangent, has_tangent(weight), has_tangent(bias)})) {
    return with_output(train_output(at::cat(inputs, 1), weight, bias, eps, c10::nullopt, relu),
                       [&] {
                         return cat_op().call(inputs, mean, var, weight, bias, running_mean,
                                              running_var, momentum, eps, relu);
                       });
  }
  if (!graph) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return cat_op().call(inputs, mean, var, weight, bias, running_mean, running_var, momentum,
                         eps, relu);
  }
  const variable_list r =
      CatWithStatsFunction::apply(inputs, mean.detach(), var.detach(), weight, bias,
                                  running_mean, running_var, momentum, eps, relu);
  return {r[0], r[1], r[2]};
}

Tensor eval_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                     const Tensor& running_mean, const Tensor& running_var, double eps,
                     const OptTensor& residual, bool relu) {
  check_not_differentiable(running_mean, "running_mean");
  check_not_differentiable(running_var, "running_var");
  const Route route = single_route(input, weight, bias, residual);
  if (route.composite) {
    return eval_output(input, weight, bias, running_mean, running_var, eps, residual, relu);
  }
  if (!route.graph) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return eval_op().call(input, weight, bias, running_mean, running_var, eps, residual, relu);
  }
  return EvalFunction::apply(input, weight, bias, running_mean, running_var, eps, residual,
                             relu)[0];
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dual_autograd(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, const Tensor& input2,
    const OptTensor& weight2, const OptTensor& bias2, const OptTensor& running_mean2,
    const OptTensor& running_var2, bool training, double momentum, double eps, double momentum2,
    double eps2, bool relu) {
  check_not_differentiable(running_mean, "running_mean");
  check_not_differentiable(running_var, "running_var");
  check_not_differentiable(running_mean2, "running_mean2");
  check_not_differentiable(running_var2, "running_var2");
  const bool graph =
      records_graph({requires_grad(input), requires_grad(weight), requires_grad(bias),
                     requires_grad(input2), requires_grad(weight2), requires_grad(bias2)});
  if (composite_path(graph, {has_tangent(input), has_tangent(weight), has_tangent(bias),
                             has_tangent(input2), has_tangent(weight2), has_tangent(bias2)})) {
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> r;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      r = dual_op().call(input, weight, bias, running_mean, running_var, input2, weight2, bias2,
                         running_mean2, running_var2, training, momentum, eps, momentum2, eps2,
                         relu);
    }
    // bn2(input2) kept in the accumulation dtype: the op takes the sum there.
    const OptTensor y2 =
        training ? train_output(input2, weight2, bias2, eps2, c10::nullopt, false, true)
                 : eval_output(input2, weight2, bias2, *running_mean2, *running_var2, eps2,
                               c10::nullopt, false, true);
    std::get<0>(r) = training ? train_output(input, weight, bias, eps, y2, relu)
                              : eval_output(input, weight, bias, *running_mean, *running_var,
                                            eps, y2, relu);
    return r;
  }
  if (!graph) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return dual_op().call(input, weight, bias, running_mean, running_var, input2, weight2, bias2,
                          running_mean2, running_var2, training, momentum, eps, momentum2, eps2,
                          relu);
  }
  const variable_list r =
      DualFunction::apply(input, weight, bias, running_mean, running_var, input2, weight2, bias2,
                          running_mean2, running_var2, training, momentum, eps, momentum2, eps2,
                          relu);
  return {r[0], r[1], r[2], r[3], r[4]};
}

// ------------------------------------------------------------------------------------------
// torch.vmap: the forward ops in ATen ops, whose batching rules do the work (FuncTorchBatched
// kernels). Arguments are checked as the device kernels check them. The running statistics are
// updated in place by ATen ops: that works when they are batched like the input (as
// torch.func.stack_module_state gives them) and fails, as torch's batch norm fails, when an
// unbatched buffer would take a batched update.

void update_running(const OptTensor& running_mean, const OptTensor& running_var,
                    const Tensor& mean, const Tensor& var, double momentum, const Tensor& input) {
  if (input.numel() == 0) return;  // as the kernels: an empty batch leaves them unchanged
  at::NoGradGuard no_grad;
  const int64_t count = input.numel() / input.size(1);
  if (running_mean.has_value() && running_mean->defined()) {
    running_mean->copy_(mean * momentum + running_mean->to(mean.scalar_type()) * (1 - momentum));
  }
  if (running_var.has_value() && running_var->defined()) {
    const double bessel = count > 1 ? double(count) / double(count - 1) : 1.0;
    running_var->copy_(var * (momentum * bessel) +
                       running_var->to(var.scalar_type()) * (1 - momentum));
  }
}

// The training forward normalized with (mean, var): (output, mean, invstd); zero statistics
// for an empty batch, as the kernels give.
Stats3 normalize_with(const Tensor& input, const Tensor& mean, const Tensor& var,
                      const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                      const OptTensor& running_var, double momentum, double eps,
                      const OptTensor& residual, bool relu, bool acc_out = false) {
  const auto acc = accumulate_dtype(input);
  update_running(running_mean, running_var, mean, var, momentum, input);
  const Tensor invstd = input.numel() == 0 ? at::zeros_like(var) : at::rsqrt(var + eps);
  const Tensor out = normalize_affine(input.to(acc), mean, invstd, value_or_undefined(weight),
                                      value_or_undefined(bias), value_or_undefined(residual),
                                      relu, acc_out ? acc : input.scalar_type());
  return {out, input.numel() == 0 ? at::zeros_like(mean) : mean.clone(), invstd};
}

Stats3 train_batched(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                     const OptTensor& running_mean, const OptTensor& running_var,
                     double momentum, double eps, const OptTensor& residual, bool relu) {
  check_train_args(input, weight, bias, running_mean, running_var, momentum, eps, residual);
  auto [mean, var] = mean_var(input.to(accumulate_dtype(input)));
  return normalize_with(input, mean, var, weight, bias, running_mean, running_var, momentum, eps,
                        residual, relu);
}

Stats3 train_with_stats_batched(const Tensor& input, const Tensor& mean, const Tensor& var,
                                const OptTensor& weight, const OptTensor& bias,
                                const OptTensor& running_mean, const OptTensor& running_var,
                                double momentum, double eps, const OptTensor& residual,
                                bool relu) {
  check_train_args(input, weight, bias, running_mean, running_var, momentum, eps, residual);
  check_stat_tensor("fastnn.batch_norm_train_with_stats", "mean", input, mean);
  check_stat_tensor("fastnn.batch_norm_train_with_stats", "var", input, var);
  return normalize_with(input, mean, var, weight, bias, running_mean, running_var, momentum, eps,
                        residual, relu);
}

Stats3 cat_batched(at::TensorList inputs, const Tensor& mean, const Tensor& var,
                   const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                   const OptTensor& running_var, double momentum, double eps, bool relu) {
  constexpr const char* kOp = "fastnn.batch_norm_cat_with_stats";
  const Tensor probe = check_cat_inputs(kOp, inputs);
  check_train_args(probe, weight, bias, running_mean, running_var, momentum, eps, c10::nullopt);
  check_stat_tensor(kOp, "mean", probe, mean);
  check_stat_tensor(kOp, "var", probe, var);
  return normalize_with(at::cat(inputs, 1), mean, var, weight, bias, running_mean, running_var,
                        momentum, eps, c10::nullopt, relu);
}

Tensor eval_batched(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                    const Tensor& running_mean, const Tensor& running_var, double eps,
                    const OptTensor& residual, bool relu) {
  check_eval_args(input, weight, bias, running_mean, running_var, eps, residual);
  return eval_output(input, weight, bias, running_mean, running_var, eps, residual, relu);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dual_batched(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, const Tensor& input2,
    const OptTensor& weight2, const OptTensor& bias2, const OptTensor& running_mean2,
    const OptTensor& running_var2, bool training, double momentum, double eps, double momentum2,
    double eps2, bool relu) {
  check_dual_args(input, weight, bias, running_mean, running_var, input2, weight2, bias2,
                  running_mean2, running_var2, training, eps, eps2);
  const auto acc = accumulate_dtype(input);
  if (!training) {
    const auto stats = [&](const Tensor& rm, const Tensor& rv, double e) {
      return std::make_pair(rm.to(acc), at::rsqrt(rv.to(acc) + e));
    };
    auto [mean, invstd] = stats(*running_mean, *running_var, eps);
    auto [mean2, invstd2] = stats(*running_mean2, *running_var2, eps2);
    const OptTensor y2 = eval_output(input2, weight2, bias2, *running_mean2, *running_var2, eps2,
                                     c10::nullopt, false, true);
    return {eval_output(input, weight, bias, *running_mean, *running_var, eps, y2, relu), mean,
            invstd, mean2, invstd2};
  }
  auto [m2, v2] = mean_var(input2.to(acc));
  auto [y2, mean2, invstd2] = normalize_with(input2, m2, v2, weight2, bias2, running_mean2,
                                             running_var2, momentum2, eps2, c10::nullopt, false,
                                             true);
  auto [m, v] = mean_var(input.to(acc));
  auto [out, mean, invstd] = normalize_with(input, m, v, weight, bias, running_mean, running_var,
                                            momentum, eps, y2, relu);
  return {out, mean, invstd, mean2, invstd2};
}

}  // namespace
}  // namespace fastnn

TORCH_LIBRARY_IMPL(fastnn, FuncTorchBatched, m) {
  m.impl("batch_norm_train", &fastnn::train_batched);
  m.impl("batch_norm_train_with_stats", &fastnn::train_with_stats_batched);
  m.impl("batch_norm_cat_with_stats", &fastnn::cat_batched);
  m.impl("batch_norm_eval", &fastnn::eval_batched);
  m.impl("batch_norm_dual", &fastnn::dual_batched);
}

TORCH_LIBRARY_IMPL(fastnn, Autograd, m) {
  m.impl("batch_norm_train", &fastnn::train_autograd);
  m.impl("batch_norm_train_with_stats", &fastnn::train_with_stats_autograd);
  m.impl("batch_norm_cat_with_stats", &fastnn::cat_autograd);
  m.impl("batch_norm_eval", &fastnn::eval_autograd);
  m.impl("batch_norm_dual", &fastnn::dual_autograd);
  // The masked forms exist for the Autograd kernels above, which call them below autograd; called
  // directly their outputs carry no gradient formula (backward raises).
  m.impl("batch_norm_train_masked", torch::autograd::autogradNotImplementedFallback());
  m.impl("batch_norm_dual_masked", torch::autograd::autogradNotImplementedFallback());
}
