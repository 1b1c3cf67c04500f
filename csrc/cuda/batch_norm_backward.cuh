// Host code shared by the backward ops' translation units (batch_norm_backward.cu: the backward
// and its parts; batch_norm_dual_backward.cu: the dual backward): the arguments every backward
// pass reads and the launches of the reduction, finalize and dx kernels of
// batch_norm_kernels.cuh. Two units, so that their kernels compile in parallel.
#pragma once

#include "batch_norm_cuda.h"
#include "batch_norm_launch.cuh"

namespace fastnn {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  KernelLayout layout;
  const scalar_t* go;
  const scalar_t* x;
  const scalar_t* out;  // forward output, for the ReLU mask (null without relu)
  const acc_t* mean;
  const acc_t* invstd;
  ChannelParam weight;
  scalar_t* gr;  // grad_residual (null unless requested)
  scalar_t* dx;
  acc_t* grad_weight;
  acc_t* grad_bias;
  acc_t inv_count;
  at::TensorOptions stat_options;
  uint8_t* fwd_mask;  // the training forward's ReLU mask (relu_mask), or null
};

// What every backward pass reads: grad_output, the input and (with relu) the output, contiguous in
// the input's memory format, and the saved statistics; args() gives their pointers.
struct BackwardInputs {
  BNShape shape;
  KernelLayout layout;
  at::Tensor go, x, out, mean, invstd;
  BackwardInputs(const at::Tensor& grad_output, const at::Tensor& input,
                 const c10::optional<at::Tensor>& output, bool relu, const at::Tensor& mean_,
                 const at::Tensor& invstd_)
      : shape(bn_shape(input)),
        layout(kernel_layout(shape)),
        go(grad_output.contiguous(shape.format)),
        x(input.contiguous(shape.format)),
        out(relu ? output->contiguous(shape.format) : at::Tensor()),
        mean(mean_.contiguous()),
        invstd(invstd_.contiguous()) {}

  template <typename scalar_t, typename acc_t>
  BackwardArgs<scalar_t, acc_t> args() const {
    BackwardArgs<scalar_t, acc_t> a{};
    a.layout = layout;
    a.go = go.data_ptr<scalar_t>();
    a.x = x.data_ptr<scalar_t>();
    a.out = out.defined() ? out.data_ptr<scalar_t>() : nullptr;
    a.mean = mean.data_ptr<acc_t>();
    a.invstd = invstd.data_ptr<acc_t>();
    return a;
  }
};

template <typename scalar_t, typename acc_t>
void launch_finalize(const BackwardArgs<scalar_t, acc_t>& a, const acc_t* partial, int64_t P,
                     bool training, acc_t* coef, cudaStream_t stream) {
  const int64_t C = a.layout.C;
  bn_backward_finalize_kernel<scalar_t, acc_t>
      <<<finalize_grid(C, P), finalize_block(P), 0, stream>>>(
          partial, P, C, a.invstd, a.weight, a.inv_count, training, a.grad_weight, a.grad_bias,
          coef, SecondInput<scalar_t, acc_t>{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The training backward's ReLU mask (see batch_norm_kernels.cuh): one byte per V-wide vector of
// the input, written by the reduce pass and read by the dx pass in place of the output. An empty
// tensor when the dx pass does not need the output's mask (no relu, grad_residual written, eval)
// or the vectors are scalars.
template <typename scalar_t, typename acc_t>
at::Tensor relu_bits(const BackwardArgs<scalar_t, acc_t>& a, bool needed, int V) {
  if (!needed || V == 1) return at::Tensor();
  const int64_t numel = a.layout.N * a.layout.C * a.layout.S;
  return at::empty({ceil_div(numel, V)}, a.stat_options.dtype(at::kByte));
}

inline uint8_t* bits_ptr(const at::Tensor& bits) {
  return bits.defined() ? bits.data_ptr<uint8_t>() : nullptr;
}

// The relu_mask argument: null when absent or empty (the output's values are read), else the
// mask a masked training forward returned for this input, checked to be one.
uint8_t* checked_relu_mask(const char* op, const c10::optional<at::Tensor>& relu_mask,
                           const at::Tensor& input) {
  if (!relu_mask.has_value() || !relu_mask->defined() || relu_mask->numel() == 0) return nullptr;
  const at::Tensor& m = *relu_mask;
  const int64_t want = relu_mask_numel(input);
  TORCH_CHECK(m.scalar_type() == at::kByte && m.dim() == 1 && m.numel() == want &&
                  m.is_contiguous(),
              op, ": relu_mask must be the ReLU mask the masked training forward returned for "
              "this input (", want, " contiguous uint8 values), got ", m.scalar_type(), " of "
              "shape ", m.sizes());
  TORCH_CHECK(m.device() == input.device(), op, ": relu_mask is on ", m.device(),
              " but input is on ", input.device());
  return m.data_ptr<uint8_t>();
}

// The reduce and dx kernels of the rows (ROWS) or planes layout.
template <bool ROWS, typename scalar_t, typename acc_t, int V, bool RELU, bool WRITE_GR,
          bool EVAL_DX, bool DUAL, int BITS>
constexpr auto reduce_kernel() {
  if constexpr (ROWS) {
    return bn_backward_reduce_rows_kernel<scalar_t, acc_t, V, RELU, WRITE_GR, EVAL_DX, DUAL, BITS>;
  } else {
    return bn_backward_reduce_planes_kernel<scalar_t, acc_t, V, RELU, WRITE_GR, EVAL_DX, DUAL,
                                            BITS>;
  }
}

template <bool ROWS, typename scalar_t, typename acc_t, int V, bool MASK, bool DUAL, bool BITS>
constexpr auto dx_kernel() {
  if constexpr (ROWS) {
    return bn_backward_dx_rows_kernel<scalar_t, acc_t, V, MASK, true, DUAL, BITS>;
  } else {
    return bn_backward_dx_planes_kernel<scalar_t, acc_t, V, MASK, true, DUAL, BITS>;
  }
}

// The on-chip training backward (bn_backward_onchip_rows_kernel; see plan_onchip): rows layouts
// of at most 32 channel vectors read V wide, one input, without relu or with the forward's ReLU
// mask. Returns false (nothing launched) where it does not apply.
template <typename scalar_t, typename acc_t, int V, bool RELU, bool WRITE_GR>
bool backward_onchip(const BackwardArgs<scalar_t, acc_t>& a) {
  constexpr auto kernel = bn_backward_onchip_rows_kernel<scalar_t, acc_t, V, RELU, WRITE_GR>;
  const KernelLayout& l = a.layout;
  OnchipPlan plan;
  if (!plan_onchip<kernel>(l, V, 3 * l.C, sizeof(acc_t), 2 * l.C * sizeof(scalar_t), plan)) {
    return false;
  }
  at::Tensor partial = at::empty({2 * static_cast<int64_t>(plan.grid.x) * l.C}, a.stat_options);
  OnchipBackwardArgs<acc_t> oa{a.mean, a.invstd, a.weight, partial.data_ptr<acc_t>(),
                               a.inv_count, a.grad_weight, a.grad_bias};
  const uint8_t* bits = a.fwd_mask;
  return launch_onchip(kernel, plan, a.go, a.x, bits, a.gr, a.dx, plan.geom, oa);
}

// The training or eval backward: a reduction pass, a finalize and in training a dx pass. The dx
// pass reads the masked gradient back from grad_residual when it was written, else grad_output
// masked by the ReLU mask the reduce pass wrote (vectors) or by the output (scalars). ROWS picks
// the layout's kernels; the two passes share one plan, so the mask's bytes are the same vectors
// in both. With FWD (training, relu, vectors) the mask is the forward's: both passes read it and
// the reduce pass no longer reads the output's vectors.
//
// With DUAL (batch_norm_dual_backward: out = [relu](bn(x) + bn2(z))) the reduction also reads z
// and sums g * (z - mean2), the finalize does both batch norms, and the dx pass writes dx and dz
// from the same g (in eval both in the reduction pass).
template <typename scalar_t, typename acc_t, int V, bool RELU, bool WRITE_GR, bool TRAINING,
          bool ROWS, bool FWD, bool DUAL>
void backward_launch(const BackwardArgs<scalar_t, acc_t>& a, SecondInput<scalar_t, acc_t> second) {
  static_assert(!FWD || (RELU && TRAINING && V > 1), "the forward's mask is of vectors");
  static_assert(!(DUAL && WRITE_GR), "the dual backward writes no grad_residual");
  if constexpr (ROWS && V > 1 && TRAINING && !DUAL && (FWD || !RELU)) {
    if (onchip_enabled() && backward_onchip<scalar_t, acc_t, V, RELU, WRITE_GR>(a)) return;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr bool kMask = RELU && !WRITE_GR;
  constexpr bool kBits = kMask && TRAINING && V > 1;
  constexpr int kReduceBits = FWD ? kBitsRead : kBits ? kBitsWrite : kBitsNone;
  constexpr int kSums = DUAL ? 3 : 2;  // per channel and block: sum g, g * (x - mean)[, z]
  auto reduce =
      reduce_kernel<ROWS, scalar_t, acc_t, V, RELU, WRITE_GR, !TRAINING, DUAL, kReduceBits>();
  // Only training launches the dx kernel; the dual eval names the training one (no other
  // instantiation).
  constexpr bool kDxBits = DUAL ? RELU && V > 1 : kBits;
  auto dx = dx_kernel<ROWS, scalar_t, acc_t, V, kMask, DUAL, kDxBits>();
  static const int bps =
      TRAINING ? std::min(blocks_per_sm(reduce), blocks_per_sm(dx)) : blocks_per_sm(reduce);
  const Launch L = plan(a.layout, V, sm_count() * bps);
  const auto& geom = geometry<ROWS>(L);
  const int64_t C = a.layout.C;
  at::Tensor partial = at::empty({kSums * L.partials * C + (TRAINING ? 3 * (kSums - 1) * C : 0)},
                                 a.stat_options);
  acc_t* pp = partial.data_ptr<acc_t>();
  acc_t* coef = TRAINING ? pp + kSums * L.partials * C : nullptr;
  if constexpr (DUAL) second.coef = TRAINING ? coef + 3 * C : nullptr;
  const at::Tensor scratch = relu_bits(a, kBits && !FWD, V);
  uint8_t* bits = FWD ? a.fwd_mask : bits_ptr(scratch);
  reduce<<<L.grid, L.block, 0, stream>>>(a.go, a.x, a.out, a.mean, a.invstd, a.weight, a.gr,
                                         TRAINING ? nullptr : a.dx, geom, pp, second, bits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bn_backward_finalize_kernel<scalar_t, acc_t, DUAL>
      <<<finalize_grid(C, L.partials), finalize_block(L.partials), 0, stream>>>(
          pp, L.partials, C, a.invstd, a.weight, a.inv_count, TRAINING, a.grad_weight,
          a.grad_bias, coef, second);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (TRAINING) {
    dx<<<L.grid, L.block, 0, stream>>>(WRITE_GR ? a.gr : a.go, a.x, a.out, a.mean, coef, a.dx,
                                       geom, second, bits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// backward_launch for the runtime flags: the vector width, relu, grad_residual written, training,
// the forward's mask given, the layout.
template <bool DUAL, typename scalar_t, typename acc_t>
void backward_dispatch(const BackwardArgs<scalar_t, acc_t>& a,
                       const SecondInput<scalar_t, acc_t>& second, bool relu, bool residual_grad,
                       bool training) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vec =
      use_vectors(a.layout, kVec, {a.go, a.x, a.out, a.gr, a.dx, second.z, second.dz});
  FASTNN_VEC_SWITCH(vec, kVec, V, [&] {
    FASTNN_BOOL_SWITCH(relu, RELU, [&] {
      FASTNN_BOOL_SWITCH(residual_grad, WRITE_GR, [&] {
        FASTNN_BOOL_SWITCH(training, TRAINING, [&] {
          FASTNN_BOOL_SWITCH(a.fwd_mask != nullptr, GIVEN, [&] {
            constexpr bool kFwd = GIVEN && RELU && TRAINING && V > 1;
            if constexpr (!(DUAL && WRITE_GR)) {
              if (a.layout.rows) {
                backward_launch<scalar_t, acc_t, V, RELU, WRITE_GR, TRAINING, true, kFwd, DUAL>(
                    a, second);
              } else {
                backward_launch<scalar_t, acc_t, V, RELU, WRITE_GR, TRAINING, false, kFwd, DUAL>(
                    a, second);
              }
            }
          });
        });
      });
    });
  });
}

// batch_norm_backward_reduce: the reduction and a finalize that writes sum(g) into grad_bias
// and sum(g * xhat) into grad_weight.
template <typename scalar_t, typename acc_t, int V, bool RELU, bool WRITE_GR>
void reduce_only(const BackwardArgs<scalar_t, acc_t>& a) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t C = a.layout.C;
  FASTNN_BOOL_SWITCH(a.layout.rows, ROWS, [&] {
    auto reduce =
        reduce_kernel<ROWS, scalar_t, acc_t, V, RELU, WRITE_GR, false, false, kBitsNone>();
    static const int bps = blocks_per_sm(reduce);
    const Launch L = plan(a.layout, V, sm_count() * bps);
    at::Tensor partial = at::empty({2 * L.partials * C}, a.stat_options);
    reduce<<<L.grid, L.block, 0, stream>>>(a.go, a.x, a.out, a.mean, a.invstd, a.weight, a.gr,
                                           nullptr, geometry<ROWS>(L), partial.data_ptr<acc_t>(),
                                           SecondInput<scalar_t, acc_t>{}, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_finalize(a, partial.data_ptr<acc_t>(), L.partials, false,
                    static_cast<acc_t*>(nullptr), stream);
  });
}

// batch_norm_backward_elemt: dx = a * g - b - d * (x - mean) with the coefficients in `coef`.
template <typename scalar_t, typename acc_t, int V, bool MASK>
void dx_only(const BackwardArgs<scalar_t, acc_t>& a, const acc_t* coef) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // REVERSE = true shares the training backward's instantiations; the order does not matter.
  FASTNN_BOOL_SWITCH(a.layout.rows, ROWS, [&] {
    auto dx = dx_kernel<ROWS, scalar_t, acc_t, V, MASK, false, false>();
    static const int bps = blocks_per_sm(dx);
    const Launch L = plan(a.layout, V, sm_count() * bps);
    dx<<<L.grid, L.block, 0, stream>>>(a.go, a.x, a.out, a.mean, coef, a.dx, geometry<ROWS>(L),
                                       SecondInput<scalar_t, acc_t>{}, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cuda
}  // namespace fastnn
