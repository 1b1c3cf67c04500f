// The one place that lists every fastnn op. Kernels live in cpu/ and cuda/, each file ending in its
// own TORCH_LIBRARY_IMPL. Python (fastnn/ops.py) adds fake kernels and autograd.
#include <Python.h>
#include <torch/library.h>

#include <array>
#include <cstdint>

namespace fastnn {
namespace cpu {
// csrc/cpu/batch_norm_cpu.cpp: route bfloat16/float16 CPU inputs through another build's kernels.
bool set_reduced_cpu_kernels(const void* tables);
// csrc/cpu/batch_norm_cpu_float.cpp: (level-2 cache, last-level cache, least output written
// with non-temporal stores by a training pass, by an inference), in bytes, as the CPU kernels
// plan with them.
std::array<int64_t, 4> cpu_cache_plan();
}  // namespace cpu
}  // namespace fastnn

namespace {
// _use_reduced_cpu_kernels(capsule) -> bool: the kernel tables of fastnn._C_avx512.
PyObject* use_reduced_cpu_kernels(PyObject*, PyObject* capsule) {
  void* tables = PyCapsule_GetPointer(capsule, "fastnn.cpu_kernel_table");
  if (tables == nullptr) return nullptr;
  return PyBool_FromLong(fastnn::cpu::set_reduced_cpu_kernels(tables) ? 1 : 0);
}

// _cpu_caches() -> (level2, last_level, stream_min_bytes, stream_min_bytes_one_pass): see
// cpu_cache_plan.
PyObject* cpu_caches(PyObject*, PyObject*) {
  const std::array<int64_t, 4> v = fastnn::cpu::cpu_cache_plan();
  return Py_BuildValue("(LLLL)", static_cast<long long>(v[0]), static_cast<long long>(v[1]),
                       static_cast<long long>(v[2]), static_cast<long long>(v[3]));
}

PyMethodDef kMethods[] = {
    {"_use_reduced_cpu_kernels", use_reduced_cpu_kernels, METH_O,
     "Run bfloat16/float16 CPU inputs on the kernels of fastnn._C_avx512 (its `kernels`)."},
    {"_cpu_caches", cpu_caches, METH_NOARGS,
     "(level-2 cache, last-level cache, least non-temporally written output of a training pass "
     "and of an inference) in bytes, as the CPU kernels plan with them."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

// `import fastnn._C` loads this shared library, and the ops register themselves.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kMethods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastnn, m) {
  // Training forward: batch statistics (biased variance for the normalization), running statistics
  // updated in place with the unbiased variance, then out = [relu](bn(input) [+ residual]).
  // Returns (output, save_mean, save_invstd); the saved statistics are [C] in the accumulation
  // dtype (float32, float64 for float64 input).
  m.def(
      "batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps, Tensor? residual, bool relu) "
      "-> (Tensor, Tensor, Tensor)");
  // batch_norm_train that also returns the ReLU mask of its output, for the backward to read in
  // place of the output (what the Autograd kernel calls when relu): a uint8 tensor of
  // ceil(numel / (16 / element size)) bytes on CUDA, of ceil(numel / 8) + 8 on the CPU (a bit
  // per element in the output's memory order, then padding), empty without relu. Its bytes are
  // only meaningful to the backward of the same device.
  m.def(
      "batch_norm_train_masked(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps, "
      "Tensor? residual, bool relu) -> (Tensor, Tensor, Tensor, Tensor)");
  // Inference with the running statistics: out = [relu](bn(input) [+ residual]).
  m.def(
      "batch_norm_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
      "Tensor running_var, float eps, Tensor? residual, bool relu) -> Tensor");
  // Backward of both forwards. mean/invstd are the saved batch statistics (training) or the
  // running mean and 1/sqrt(running_var + eps) (eval), in the accumulation dtype. `output` is the
  // forward's output, needed only for the ReLU mask; relu_mask, the mask batch_norm_train_masked
  // returned (or None, or empty), saves reading most of it. Returns (grad_input, grad_weight,
  // grad_bias, grad_residual): grad_weight/grad_bias are [C] in the accumulation dtype;
  // grad_residual is the ReLU-masked grad_output when residual_grad is set, else an empty tensor.
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? output, "
      "Tensor mean, Tensor invstd, bool training, bool relu, bool residual_grad, "
      "Tensor? relu_mask=None) -> (Tensor, Tensor, Tensor, Tensor)");

  // Two batch norms added, for a ResNet block with a downsampling shortcut:
  // out = [relu](bn(input) + bn2(input2)), input2 of input's size, each batch norm with its own
  // parameters, running statistics, momentum and eps; training (batch statistics, running
  // statistics updated) or inference (running statistics). Returns (output, mean, invstd,
  // mean2, invstd2): the statistics each input was normalized with, in the accumulation dtype;
  // batch_norm_backward of each input (masked by the output for relu) is the gradient.
  m.def(
      "batch_norm_dual(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor input2, Tensor? weight2, Tensor? bias2, "
      "Tensor(c!)? running_mean2, Tensor(d!)? running_var2, bool training, float momentum, "
      "float eps, float momentum2, float eps2, bool relu) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // batch_norm_dual that also returns its output's ReLU mask (training with relu; as
  // batch_norm_train_masked's).
  m.def(
      "batch_norm_dual_masked(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor input2, Tensor? weight2, "
      "Tensor? bias2, Tensor(c!)? running_mean2, Tensor(d!)? running_var2, bool training, "
      "float momentum, float eps, float momentum2, float eps2, bool relu) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Its backward: (grad_input, grad_weight, grad_bias, grad_input2, grad_weight2, grad_bias2),
  // the parameter gradients in the accumulation dtype; the output gradient (zeroed where
  // output <= 0 when relu) is read once for both inputs; relu_mask as batch_norm_backward's.
  m.def(
      "batch_norm_dual_backward(Tensor grad_output, Tensor input, Tensor? weight, "
      "Tensor input2, Tensor? weight2, Tensor? output, Tensor mean, Tensor invstd, "
      "Tensor mean2, Tensor invstd2, bool training, bool relu, Tensor? relu_mask=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // The training forward and backward in parts, for statistics computed or reduced elsewhere
  // (SyncBatchNorm over a process group, statistics shared by DenseNet layers). Normalizing with
  // given statistics is batch_norm_eval.
  //
  // Batch mean and biased variance per channel, in the accumulation dtype; zeros for an empty
  // batch.
  m.def("batch_norm_stats(Tensor input) -> (Tensor, Tensor)");
  // batch_norm_train for an input whose batch statistics are known already (mean, biased var;
  // accumulation dtype): no statistics pass. The backward is batch_norm_backward's training one.
  m.def(
      "batch_norm_train_with_stats(Tensor input, Tensor mean, Tensor var, Tensor? weight, "
      "Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, "
      "float eps, Tensor? residual, bool relu) -> (Tensor, Tensor, Tensor)");
  // batch_norm_train_with_stats of the concatenation of `inputs` along dim 1 (DenseNet's earlier
  // feature maps), read where they are: the concatenated copy is never made. mean/var are the
  // concatenation's per-channel statistics; the output is the normalized concatenation (layout:
  // channels_last when every input is). No residual. The backward is batch_norm_backward's
  // training one of the concatenation.
  m.def(
      "batch_norm_cat_with_stats(Tensor[] inputs, Tensor mean, Tensor var, Tensor? weight, "
      "Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, "
      "float eps, bool relu) -> (Tensor, Tensor, Tensor)");
  // The reductions of the training backward: per channel sum_dy = sum(g) and
  // sum_dy_xhat = sum(g * (input - mean) * invstd), in the accumulation dtype, g being
  // grad_output zeroed where output <= 0 when relu. With residual_grad the masked g is returned too
  // (the residual's gradient), else an empty tensor.
  m.def(
      "batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor? output, Tensor mean, "
      "Tensor invstd, bool relu, bool residual_grad) -> (Tensor, Tensor, Tensor)");
  // The element-wise part of the training backward: grad_input =
  // weight * invstd * (g - mean_dy - (input - mean) * invstd * mean_dy_xhat), g masked as above;
  // mean_dy and mean_dy_xhat are the reductions divided by the number of values per channel.
  m.def(
      "batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor? weight, "
      "Tensor? output, Tensor mean, Tensor invstd, Tensor mean_dy, Tensor mean_dy_xhat, "
      "bool relu) -> Tensor");
}
