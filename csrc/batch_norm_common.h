// Host-side pieces shared by the CPU and CUDA kernels: argument checks that name the argument,
// the layout rule, and the running-statistics update.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace fastnn {

// The three-dimensional view every kernel works on: input viewed as (N, C, S) where S is the product
// of the spatial sizes. channels_last means memory order (N, S, C); rank-2 input is (N, C) with
// S = 1 and counts as channels_last (C is the fastest dimension either way).
struct BNShape {
  int64_t N;
  int64_t C;
  int64_t S;
  bool channels_last;
  at::MemoryFormat format;  // memory format of the contiguous copy the kernels read and write
  int64_t reduce_size() const { return N * S; }
};

// The memory format outputs take for `input`, torch's batch norm's rule (fake kernels in
// fastnn/ops.py use the same): input.suggest_memory_format(), channels_last (3d) when the strides
// are ordered like it. Tensors contiguous in both formats (sizes of 1) follow their strides, as
// torch's outputs do, so that ops downstream (convolutions) see the same layout.
at::MemoryFormat output_memory_format(const at::Tensor& input);

BNShape bn_shape(const at::Tensor& input);

// float32 for reduced-precision and float32 input, float64 for float64.
at::ScalarType accumulate_type(at::ScalarType input_type);

// Checks shared by every op: rank >= 2, floating dtype, and that each per-channel tensor given has
// C elements, lives on input's device and has a dtype the kernels accept (the input's own, or
// float32 for float16/bfloat16 input). `name` is the op name used in the messages.
void check_input(const char* op, const at::Tensor& input);
void check_channel_tensor(const char* op, const char* arg, const at::Tensor& input,
                          const c10::optional<at::Tensor>& t);
void check_same_shape(const char* op, const char* arg, const at::Tensor& input, const at::Tensor& t);
void check_stat_tensor(const char* op, const char* arg, const at::Tensor& input, const at::Tensor& t);
void check_train_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& running_mean,
                      const c10::optional<at::Tensor>& running_var, double momentum, double eps,
                      const c10::optional<at::Tensor>& residual);
void check_eval_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                     const at::Tensor& running_var, double eps,
                     const c10::optional<at::Tensor>& residual);
void check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                         const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& output, const at::Tensor& mean,
                         const at::Tensor& invstd, bool relu);
// The same checks for any op that takes a gradient; `op` names it in the messages.
void check_grad_args(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                     const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& output, const at::Tensor& mean,
                     const at::Tensor& invstd, bool relu);

// The checks of batch_norm_dual: both inputs, with input2 (and its parameters) named as such.
void check_dual_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& running_mean,
                     const c10::optional<at::Tensor>& running_var, const at::Tensor& input2,
                     const c10::optional<at::Tensor>& weight2,
                     const c10::optional<at::Tensor>& bias2,
                     const c10::optional<at::Tensor>& running_mean2,
                     const c10::optional<at::Tensor>& running_var2, bool training, double eps,
                     double eps2);

// The inputs of batch_norm_cat_with_stats (feature maps concatenated along dim 1): at least one,
// each a valid input of one dtype, rank and device, sizes equal but for dim 1. Returns a
// zero-storage tensor of the concatenation's size, dtype and device (an expanded scalar) for the
// checks that take the whole input.
at::Tensor check_cat_inputs(const char* op, at::TensorList inputs);
// The concatenation's memory format, torch.cat's rule: the inputs' suggested memory format when
// they all suggest the same one, else contiguous.
at::MemoryFormat cat_memory_format(at::TensorList inputs);

// Empty [C] statistics / gradients for the N = 0 case, so every kernel treats it the same way.
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_batch_train(const at::Tensor& input);

}  // namespace fastnn
