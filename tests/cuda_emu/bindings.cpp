// Python bindings of csrc/cuda's host functions built for the CPU emulation (see emu.h): each
// takes CPU tensors and runs the CUDA kernels on emulated threads.
#include <torch/extension.h>

#include "batch_norm_cuda.h"
#include "emu.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cat_with_stats(
    const std::vector<at::Tensor>& inputs, const at::Tensor& mean, const at::Tensor& var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    double momentum, double eps, bool relu) {
  return fastnn::cuda::batch_norm_cat_with_stats_cuda(inputs, mean, var, weight, bias,
                                                      running_mean, running_var, momentum, eps,
                                                      relu);
}

using OptTensor = c10::optional<at::Tensor>;

// The backwards with relu_mask optional, as in the op schemas.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const OptTensor& weight,
    const OptTensor& output, const at::Tensor& mean, const at::Tensor& invstd, bool training,
    bool relu, bool residual_grad, const OptTensor& relu_mask) {
  return fastnn::cuda::batch_norm_backward_cuda(grad_output, input, weight, output, mean, invstd,
                                                training, relu, residual_grad, relu_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const OptTensor& weight,
    const at::Tensor& input2, const OptTensor& weight2, const OptTensor& output,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& mean2,
    const at::Tensor& invstd2, bool training, bool relu, const OptTensor& relu_mask) {
  return fastnn::cuda::batch_norm_dual_backward_cuda(grad_output, input, weight, input2, weight2,
                                                     output, mean, invstd, mean2, invstd2,
                                                     training, relu, relu_mask);
}

void configure(int sm_count, int blocks_per_sm, int schedule, uint64_t seed) {
  TORCH_CHECK(sm_count >= 1 && blocks_per_sm >= 1 && schedule >= 0 && schedule <= 2,
              "cuda_emu.configure: bad settings");
  auto& s = fastnn_emu::settings();
  s.sm_count = sm_count;
  s.blocks_per_sm = blocks_per_sm;
  s.schedule = schedule;
  s.seed = seed;
}

// The dynamic shared memory a block may have (the device's opt-in limit; 227 KB by default).
void set_shared_memory(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "cuda_emu.set_shared_memory: bad size");
  fastnn_emu::settings().smem_optin = bytes;
}

std::tuple<int64_t, int64_t> counters() {
  const auto& s = fastnn_emu::settings();
  return {s.launches, s.blocks};
}

}  // namespace

namespace fastnn_emu_check {
at::Tensor block_sum(const at::Tensor& x, int64_t threads, bool barrier);
at::Tensor warp_sum(const at::Tensor& x, int64_t bx, int64_t by);
void divergent_barrier(int64_t threads);
void launch_config(int64_t gx, int64_t gy, int64_t bx, int64_t by);
at::Tensor bounded(int64_t threads);
at::Tensor grid_exchange(int64_t blocks, int64_t threads, int64_t skip);
void static_shared_cooperative();
}  // namespace fastnn_emu_check

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace fc = fastnn::cuda;
  m.def("configure", &configure);
  m.def("counters", &counters);
  m.def("set_shared_memory", &set_shared_memory);
  m.def("check_block_sum", &fastnn_emu_check::block_sum);
  m.def("check_warp_sum", &fastnn_emu_check::warp_sum);
  m.def("check_divergent_barrier", &fastnn_emu_check::divergent_barrier);
  m.def("check_launch_config", &fastnn_emu_check::launch_config);
  m.def("check_launch_bounds", &fastnn_emu_check::bounded);
  m.def("check_grid_exchange", &fastnn_emu_check::grid_exchange);
  m.def("check_static_shared_cooperative", &fastnn_emu_check::static_shared_cooperative);
  namespace py = pybind11;
  m.def("batch_norm_train", &fc::batch_norm_train_cuda);
  m.def("batch_norm_train_masked", &fc::batch_norm_train_masked_cuda);
  m.def("batch_norm_eval", &fc::batch_norm_eval_cuda);
  m.def("batch_norm_backward", &backward, py::arg("grad_output"), py::arg("input"),
        py::arg("weight"), py::arg("output"), py::arg("mean"), py::arg("invstd"),
        py::arg("training"), py::arg("relu"), py::arg("residual_grad"),
        py::arg("relu_mask") = py::none());
  m.def("batch_norm_dual", &fc::batch_norm_dual_cuda);
  m.def("batch_norm_dual_masked", &fc::batch_norm_dual_masked_cuda);
  m.def("batch_norm_dual_backward", &dual_backward, py::arg("grad_output"), py::arg("input"),
        py::arg("weight"), py::arg("input2"), py::arg("weight2"), py::arg("output"),
        py::arg("mean"), py::arg("invstd"), py::arg("mean2"), py::arg("invstd2"),
        py::arg("training"), py::arg("relu"), py::arg("relu_mask") = py::none());
  m.def("batch_norm_stats", &fc::batch_norm_stats_cuda);
  m.def("batch_norm_train_with_stats", &fc::batch_norm_train_with_stats_cuda);
  m.def("batch_norm_backward_reduce", &fc::batch_norm_backward_reduce_cuda);
  m.def("batch_norm_backward_elemt", &fc::batch_norm_backward_elemt_cuda);
  m.def("batch_norm_cat_with_stats", &cat_with_stats);
}
