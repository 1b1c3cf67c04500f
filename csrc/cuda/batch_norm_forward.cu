// CUDA forward ops: batch_norm_train (statistics -> finalize -> normalize), batch_norm_eval
// (normalize with the running statistics), the training forward in parts: batch_norm_stats
// (statistics -> finalize), batch_norm_train_with_stats (given statistics -> normalize) and
// batch_norm_cat_with_stats (the same over a list of feature maps), and batch_norm_dual. Host
// code only; the kernels are in batch_norm_kernels.cuh.
#include <ATen/ops/cat.h>

#include "batch_norm_cuda.h"
#include "batch_norm_launch.cuh"

namespace fastnn {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t>
struct TrainArgs {
  KernelLayout layout;
  const scalar_t* x;
  const scalar_t* res;
  scalar_t* out;
  acc_t* save_mean;
  acc_t* save_invstd;
  AffineParams<acc_t> affine;  // weight and bias; mean/invstd are set to the saved statistics
  RunningUpdate<acc_t> running;
  acc_t inv_count;
  acc_t eps;
  at::TensorOptions stat_options;
  uint8_t* mask;  // the ReLU mask to write (see batch_norm_kernels.cuh), or null
};

// Where each channel's statistics shift is sampled (see channel_shift): its first element, one
// in the middle and its last.
inline ShiftSamples shift_samples(const KernelLayout& l) {
  ShiftSamples s{};
  if (l.rows) {
    const int64_t R = l.N * l.S;
    s.cstride = 1;
    s.off[0] = 0;
    s.off[1] = (R / 2) * l.C;
    s.off[2] = (R - 1) * l.C;
  } else {
    const int64_t plane = l.C * l.S;  // from one plane of a channel to the next
    s.cstride = l.S;
    s.off[0] = 0;
    s.off[1] = (l.N / 2) * plane + l.S / 2;
    s.off[2] = (l.N - 1) * plane + l.S - 1;
  }
  return s;
}

// The rows statistics kernel for inputs the normalize kernels read V wide: 16-bit inputs in
// 8-byte vectors, 8 rows per step (see bn_stats_rows_kernel). Where V = 8 is allowed (16-byte
// aligned, C a multiple of 8) so is 4.
template <typename scalar_t, typename acc_t, int V>
struct StatsRows {
  static constexpr int width = (sizeof(scalar_t) == 2 && V == 8) ? 4 : V;
  static constexpr int unroll = kUnroll * V / width;
  static constexpr auto kernel = bn_stats_rows_kernel<scalar_t, acc_t, width, unroll>;
};

// The running-statistics update of a batch of `count` values per channel.
template <typename acc_t>
RunningUpdate<acc_t> running_update(const c10::optional<at::Tensor>& running_mean,
                                    const c10::optional<at::Tensor>& running_var,
                                    at::ScalarType acc, double momentum, int64_t count) {
  RunningUpdate<acc_t> r{};
  r.mean = running_stat(running_mean, acc);
  r.var = running_stat(running_var, acc);
  r.momentum = static_cast<acc_t>(momentum);
  r.one_minus_momentum = static_cast<acc_t>(1.0 - momentum);
  const double bessel =
      count > 1 ? static_cast<double>(count) / static_cast<double>(count - 1) : 1.0;
  r.momentum_unbiased = static_cast<acc_t>(momentum * bessel);
  return r;
}

template <typename scalar_t, typename acc_t>
void launch_finalize(const TrainArgs<scalar_t, acc_t>& a, const acc_t* partial, int64_t P,
                     cudaStream_t stream) {
  const int64_t C = a.layout.C;
  bn_stats_finalize_kernel<scalar_t, acc_t>
      <<<finalize_grid(C, P), finalize_block(P), 0, stream>>>(
          partial, P, C, a.x, shift_samples(a.layout), a.inv_count, a.eps, a.save_mean,
          a.save_invstd, a.running);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
AffineParams<acc_t> with_saved_stats(AffineParams<acc_t> p, const acc_t* mean,
                                     const acc_t* invstd) {
  p.mean = ChannelParam{mean, 1, true};
  p.invstd = ChannelParam{invstd, 1, true};
  p.from_var = false;
  return p;
}

// The statistics kernel of the rows (ROWS) or planes layout for inputs the normalize reads V
// wide, and the vector width it reads.
template <bool ROWS, typename scalar_t, typename acc_t, int V>
constexpr auto stats_kernel() {
  if constexpr (ROWS) {
    return StatsRows<scalar_t, acc_t, V>::kernel;
  } else {
    return bn_stats_planes_kernel<scalar_t, acc_t, V>;
  }
}

template <bool ROWS, typename scalar_t, typename acc_t, int V>
constexpr int stats_width() {
  return ROWS ? StatsRows<scalar_t, acc_t, V>::width : V;
}

// The normalize kernel of the layout. REVERSE is always true: the training forward walks back
// over what its statistics pass read last, and elsewhere the order does not matter (one
// instantiation serves both).
template <bool ROWS, typename scalar_t, typename acc_t, int V, bool RES, bool RELU, bool DUAL,
          bool MASK>
constexpr auto normalize_kernel() {
  if constexpr (ROWS) {
    return bn_normalize_rows_kernel<scalar_t, acc_t, V, RES, RELU, true, DUAL, MASK>;
  } else {
    return bn_normalize_planes_kernel<scalar_t, acc_t, V, RES, RELU, true, DUAL, MASK>;
  }
}

// The on-chip training forward (bn_train_onchip_rows_kernel; see plan_onchip): rows layouts of
// at most 32 channel vectors (256 16-bit, 128 float32 or 64 float64 channels), read V wide,
// without a residual. Returns false (nothing launched) where it does not apply.
template <typename scalar_t, typename acc_t, int V, bool RELU, bool MASK>
bool train_onchip(const TrainArgs<scalar_t, acc_t>& a) {
  constexpr auto kernel = bn_train_onchip_rows_kernel<scalar_t, acc_t, V, RELU, MASK>;
  const KernelLayout& l = a.layout;
  OnchipPlan plan;
  if (!plan_onchip<kernel>(l, V, 2 * l.C, sizeof(acc_t), l.C * sizeof(scalar_t), plan)) {
    return false;
  }
  at::Tensor partial = at::empty({3 * static_cast<int64_t>(plan.grid.x) * l.C}, a.stat_options);
  OnchipArgs<acc_t> oa{partial.data_ptr<acc_t>(), shift_samples(l), a.inv_count, a.eps,
                       a.save_mean, a.save_invstd, a.running};
  return launch_onchip(kernel, plan, a.x, a.out, a.affine, plan.geom, oa, a.mask);
}

// batch_norm_train: the statistics pass, its finalize (saved statistics, running update) and the
// normalize. Both passes fill the device once with the same number of threads, each walking its
// rows in order, so that normalize, walking backwards, revisits first what the statistics pass
// read last (the last rows, whichever vector width each kernel reads).
template <typename scalar_t, typename acc_t, int V, bool RES, bool RELU, bool MASK, bool ROWS>
void train_launch(const TrainArgs<scalar_t, acc_t>& a) {
  if constexpr (ROWS && V > 1 && !RES) {
    if (onchip_enabled() && train_onchip<scalar_t, acc_t, V, RELU, MASK>(a)) return;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto stats = stats_kernel<ROWS, scalar_t, acc_t, V>();
  auto norm = normalize_kernel<ROWS, scalar_t, acc_t, V, RES, RELU, false, MASK>();
  static const int bps = std::min(blocks_per_sm(stats), blocks_per_sm(norm));
  const Launch Ls =
      plan(a.layout, stats_width<ROWS, scalar_t, acc_t, V>(), sm_count() * bps);
  const Launch L = plan(a.layout, V, sm_count() * bps);
  at::Tensor partial = at::empty({3 * Ls.partials * a.layout.C}, a.stat_options);
  acc_t* pp = partial.data_ptr<acc_t>();
  stats<<<Ls.grid, Ls.block, 0, stream>>>(a.x, geometry<ROWS>(Ls), shift_samples(a.layout), pp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_finalize(a, pp, Ls.partials, stream);
  norm<<<L.grid, L.block, 0, stream>>>(a.x, a.res, a.out,
                                       with_saved_stats(a.affine, a.save_mean, a.save_invstd),
                                       geometry<ROWS>(L), AffineParams<acc_t>{}, a.mask);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int V, bool RES, bool RELU>
void eval_launch(const KernelLayout& layout, const scalar_t* x, const scalar_t* res, scalar_t* out,
                 const AffineParams<acc_t>& affine) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTNN_BOOL_SWITCH(layout.rows, ROWS, [&] {
    auto norm = normalize_kernel<ROWS, scalar_t, acc_t, V, RES, RELU, false, false>();
    static const int bps = blocks_per_sm(norm);
    const Launch L = plan(layout, V, sm_count() * bps);
    norm<<<L.grid, L.block, 0, stream>>>(x, res, out, affine, geometry<ROWS>(L),
                                         AffineParams<acc_t>{}, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The ReLU mask a masked training forward returns: one byte per 16-byte vector of the output
// (ceil(numel / (16 / element size)) bytes), written by the normalize kernel (or from the output
// when the normalize ran V = 1 wide); empty when not asked for. Its bytes are read only by a
// backward that runs 16-byte vectors, on the vectors the normalize's plan gives at that width.
// The kernels write the byte of every vector; where the output is not all vectors (planes whose
// size is not a multiple of the width have a scalar head and tail; rows whose channel count is
// not run element by element) the mask starts zeroed: no backward reads those bytes, but the
// op's output is then fully defined, the same on every call.
inline at::Tensor relu_mask_tensor(const at::Tensor& input, bool wanted) {
  const at::TensorOptions options = input.options().dtype(at::kByte);
  if (!wanted) return at::empty({0}, options);
  const int64_t V = 16 / input.element_size();
  const KernelLayout l = kernel_layout(bn_shape(input));
  const bool all_vectors = l.rows ? l.C % V == 0 : l.S % V == 0;
  const int64_t n = relu_mask_numel(input);
  return all_vectors ? at::empty({n}, options) : at::zeros({n}, options);
}

// The mask of an output the normalize wrote V = 1 wide, at the width the backward reads it;
// nothing where the backward cannot run vectors (rows with C not a multiple of the width).
template <typename scalar_t>
void relu_mask_from_output(const KernelLayout& layout, const scalar_t* out, uint8_t* mask) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (!use_vectors(layout, kVec, {out})) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (layout.rows) {
    auto kernel = bn_relu_mask_rows_kernel<scalar_t, kVec>;
    static const int bps = blocks_per_sm(kernel);
    const Launch L = plan_rows(layout, kVec, sm_count() * bps);
    kernel<<<L.grid, L.block, 0, stream>>>(out, L.rows, mask);
  } else {
    auto kernel = bn_relu_mask_planes_kernel<scalar_t, kVec>;
    static const int bps = blocks_per_sm(kernel);
    const Launch L = plan_planes(layout, kVec, sm_count() * bps);
    kernel<<<L.grid, L.block, 0, stream>>>(out, L.planes, mask);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// save_mean/save_invstd from given statistics (see bn_given_stats_kernel); C > 0.
template <typename scalar_t, typename acc_t>
void launch_given_stats(const ChannelParam& mean, const ChannelParam& var, int64_t C, double eps,
                        acc_t* save_mean, acc_t* save_invstd, const RunningUpdate<acc_t>& ru,
                        cudaStream_t stream) {
  constexpr int kBlock = 256;
  bn_given_stats_kernel<scalar_t, acc_t>
      <<<static_cast<unsigned>(ceil_div(C, kBlock)), kBlock, 0, stream>>>(
          mean, var, C, eps, save_mean, save_invstd, ru);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The training forward with given batch statistics (mean, biased var), up to the normalize:
// save_mean/save_invstd written and the running statistics updated (count values per channel);
// returns the normalize's parameters.
template <typename scalar_t, typename acc_t>
AffineParams<acc_t> given_stats_affine(const at::Tensor& mean, const at::Tensor& var,
                                       const c10::optional<at::Tensor>& weight,
                                       const c10::optional<at::Tensor>& bias,
                                       const c10::optional<at::Tensor>& running_mean,
                                       const c10::optional<at::Tensor>& running_var,
                                       double momentum, double eps, int64_t count,
                                       at::Tensor& save_mean, at::Tensor& save_invstd,
                                       cudaStream_t stream) {
  const at::ScalarType acc = save_mean.scalar_type();
  acc_t* sm = save_mean.data_ptr<acc_t>();
  acc_t* si = save_invstd.data_ptr<acc_t>();
  launch_given_stats<scalar_t, acc_t>(
      channel_param(mean, acc), channel_param(var, acc), mean.size(0), eps, sm, si,
      running_update<acc_t>(running_mean, running_var, acc, momentum, count), stream);
  AffineParams<acc_t> affine{};
  affine.weight = channel_param(weight, acc);
  affine.bias = channel_param(bias, acc);
  return with_saved_stats(affine, sm, si);
}

template <typename scalar_t, typename acc_t>
struct DualArgs {
  KernelLayout layout;
  bool training;
  const scalar_t* x;
  const scalar_t* z;
  scalar_t* out;
  acc_t* mean[2];    // the statistics each input is normalized with (outputs of the op)
  acc_t* invstd[2];
  AffineParams<acc_t> affine[2];  // weight and bias of each batch norm
  RunningUpdate<acc_t> running[2];
  acc_t inv_count;
  acc_t eps[2];
  at::TensorOptions stat_options;
  uint8_t* mask;  // the ReLU mask to write (training), or null
};

// batch_norm_dual: in training the statistics pass of each input and their finalize (running
// statistics updated), then one pass out = [relu](bn(x) + bn2(z)). In eval mean/invstd are
// already set from the running statistics.
template <typename scalar_t, typename acc_t, int V, bool RELU, bool ROWS, bool MASK>
void dual_launch(const DualArgs<scalar_t, acc_t>& a) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto stats = stats_kernel<ROWS, scalar_t, acc_t, V>();
  auto norm = normalize_kernel<ROWS, scalar_t, acc_t, V, true, RELU, true, MASK>();
  static const int bps = std::min(blocks_per_sm(stats), blocks_per_sm(norm));
  const Launch L = plan(a.layout, V, sm_count() * bps);
  const int64_t C = a.layout.C;
  if (a.training) {
    const Launch Ls = plan(a.layout, stats_width<ROWS, scalar_t, acc_t, V>(), sm_count() * bps);
    at::Tensor partial = at::empty({2 * 3 * Ls.partials * C}, a.stat_options);
    const scalar_t* inputs[2] = {a.x, a.z};
    for (int k = 0; k < 2; ++k) {
      acc_t* pp = partial.data_ptr<acc_t>() + k * 3 * Ls.partials * C;
      stats<<<Ls.grid, Ls.block, 0, stream>>>(inputs[k], geometry<ROWS>(Ls),
                                              shift_samples(a.layout), pp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      bn_stats_finalize_kernel<scalar_t, acc_t>
          <<<finalize_grid(C, Ls.partials), finalize_block(Ls.partials), 0, stream>>>(
              pp, Ls.partials, C, inputs[k], shift_samples(a.layout), a.inv_count, a.eps[k],
              a.mean[k], a.invstd[k], a.running[k]);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  norm<<<L.grid, L.block, 0, stream>>>(a.x, a.z, a.out,
                                       with_saved_stats(a.affine[0], a.mean[0], a.invstd[0]),
                                       geometry<ROWS>(L),
                                       with_saved_stats(a.affine[1], a.mean[1], a.invstd[1]),
                                       a.mask);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// batch_norm_cat_with_stats's normalize: one launch over every output channel.
template <typename scalar_t, typename acc_t, int V, bool RELU>
void cat_launch(const KernelLayout& layout, const CatInputs& in, scalar_t* out,
                const AffineParams<acc_t>& affine) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (layout.rows) {
    auto norm = bn_cat_normalize_rows_kernel<scalar_t, acc_t, V, RELU>;
    static const int bps = blocks_per_sm(norm);
    const Launch L = plan_rows(layout, V, sm_count() * bps);
    norm<<<L.grid, L.block, 0, stream>>>(in, out, affine, L.rows);
  } else {
    auto norm = bn_cat_normalize_planes_kernel<scalar_t, acc_t, V, RELU>;
    static const int bps = blocks_per_sm(norm);
    const Launch L = plan_planes(layout, V, sm_count() * bps);
    norm<<<L.grid, L.block, 0, stream>>>(in, out, affine, L.planes);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether the cat kernels may use V-element vectors: every pointer 16-byte aligned and, so that
// an input's vectors land on the output's vector boundaries, in rows every input's channel count a
// multiple of V, in planes each input's offset into the output a multiple of V elements.
inline bool cat_use_vectors(const KernelLayout& layout, int64_t V, const CatInputs& in,
                            const void* out) {
  if (!use_vectors(layout, V, {out})) return false;
  for (int i = 0; i < in.n; ++i) {
    const int64_t ci = in.c0[i + 1] - in.c0[i];
    if (ci == 0) continue;  // never read
    if (!aligned16(in.ptr[i])) return false;
    if (layout.rows && ci % V != 0) return false;
    if (!layout.rows && (((layout.C - ci) * layout.S) % V != 0 || (in.c0[i] * layout.S) % V != 0)) {
      return false;
    }
  }
  return true;
}

// batch_norm_stats: the statistics pass and a finalize that writes the mean and the biased
// variance.
template <typename scalar_t, typename acc_t, int V>
void stats_launch(const KernelLayout& layout, const scalar_t* x, acc_t inv_count, acc_t* mean,
                  acc_t* var, const at::TensorOptions& stat_options) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Launch L;
  at::Tensor partial;
  if (layout.rows) {
    using SR = StatsRows<scalar_t, acc_t, V>;
    auto stats = SR::kernel;
    static const int bps = blocks_per_sm(stats);
    L = plan_rows(layout, SR::width, sm_count() * bps);
    partial = at::empty({3 * L.partials * layout.C}, stat_options);
    stats<<<L.grid, L.block, 0, stream>>>(x, L.rows, shift_samples(layout),
                                          partial.data_ptr<acc_t>());
  } else {
    auto stats = bn_stats_planes_kernel<scalar_t, acc_t, V>;
    static const int bps = blocks_per_sm(stats);
    L = plan_planes(layout, V, sm_count() * bps);
    partial = at::empty({3 * L.partials * layout.C}, stat_options);
    stats<<<L.grid, L.block, 0, stream>>>(x, L.planes, shift_samples(layout),
                                          partial.data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bn_stats_finalize_kernel<scalar_t, acc_t, true>
      <<<finalize_grid(layout.C, L.partials), finalize_block(L.partials), 0, stream>>>(
          partial.data_ptr<acc_t>(), L.partials, layout.C, x, shift_samples(layout), inv_count,
          acc_t(0), mean, var, RunningUpdate<acc_t>{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

namespace {

// What a normalizing forward reads and writes: the input and the residual (if any) contiguous in
// the input's memory format, and the output allocated in it.
struct NormalizeIO {
  BNShape shape;
  KernelLayout layout;
  at::Tensor x, res, out;
  NormalizeIO(const at::Tensor& input, const c10::optional<at::Tensor>& residual)
      : shape(bn_shape(input)),
        layout(kernel_layout(shape)),
        x(input.contiguous(shape.format)),
        res(defined(residual) ? residual->contiguous(shape.format) : at::Tensor()),
        out(at::empty(input.sizes(), input.options().memory_format(shape.format))) {}
};

// batch_norm_train, and with `want_mask` and relu also the ReLU mask of the output (else an
// empty tensor): (output, save_mean, save_invstd, mask).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> train_impl(
    const char* op, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum, double eps,
    const c10::optional<at::Tensor>& residual, bool relu, bool want_mask) {
  check_train_args(input, weight, bias, running_mean, running_var, momentum, eps, residual);
  TORCH_CHECK(input.is_cuda(), op, ": input must be a CUDA tensor, got ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor mask = relu_mask_tensor(input, want_mask && relu);
  if (input.numel() == 0) {
    auto [out, mean, invstd] = empty_batch_train(input);
    return {out, mean, invstd, mask};
  }

  const NormalizeIO io(input, residual);
  const KernelLayout& layout = io.layout;
  const at::Tensor &x = io.x, &res = io.res, &out = io.out;
  const bool has_res = res.defined();
  const at::ScalarType acc = accumulate_type(input.scalar_type());
  const at::TensorOptions stat_options = input.options().dtype(acc);
  at::Tensor save_mean = at::empty({io.shape.C}, stat_options);
  at::Tensor save_invstd = at::empty({io.shape.C}, stat_options);
  const int64_t count = io.shape.reduce_size();  // > 1, checked above

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fastnn_batch_norm_train_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    TrainArgs<scalar_t, acc_t> a{};
    a.layout = layout;
    a.x = x.data_ptr<scalar_t>();
    a.res = has_res ? res.data_ptr<scalar_t>() : nullptr;
    a.out = out.data_ptr<scalar_t>();
    a.save_mean = save_mean.data_ptr<acc_t>();
    a.save_invstd = save_invstd.data_ptr<acc_t>();
    a.affine.weight = channel_param(weight, acc);
    a.affine.bias = channel_param(bias, acc);
    a.affine.from_var = false;
    a.affine.eps = static_cast<acc_t>(eps);
    a.running = running_update<acc_t>(running_mean, running_var, acc, momentum, count);
    a.inv_count = static_cast<acc_t>(1.0 / static_cast<double>(count));
    a.eps = static_cast<acc_t>(eps);
    a.stat_options = stat_options;
    a.mask = mask.numel() > 0 ? mask.data_ptr<uint8_t>() : nullptr;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = use_vectors(layout, kVec, {a.x, a.res, a.out});
    FASTNN_VEC_SWITCH(vec, kVec, V, [&] {
      FASTNN_BOOL_SWITCH(has_res, RES, [&] {
        FASTNN_BOOL_SWITCH(relu, RELU, [&] {
          FASTNN_BOOL_SWITCH(a.mask != nullptr, WANT, [&] {
            constexpr bool kMask = WANT && RELU && V > 1;
            if (layout.rows) {
              train_launch<scalar_t, acc_t, V, RES, RELU, kMask, true>(a);
            } else {
              train_launch<scalar_t, acc_t, V, RES, RELU, kMask, false>(a);
            }
          });
        });
      });
    });
    if (a.mask != nullptr && !vec) relu_mask_from_output(layout, a.out, a.mask);
  });
  return {out, save_mean, save_invstd, mask};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum, double eps,
    const c10::optional<at::Tensor>& residual, bool relu) {
  auto [out, mean, invstd, mask] =
      train_impl("fastnn.batch_norm_train", input, weight, bias, running_mean, running_var,
                 momentum, eps, residual, relu, false);
  return {out, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_train_masked_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum, double eps,
    const c10::optional<at::Tensor>& residual, bool relu) {
  return train_impl("fastnn.batch_norm_train_masked", input, weight, bias, running_mean,
                    running_var, momentum, eps, residual, relu, true);
}

at::Tensor batch_norm_eval_cuda(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias,
                                const at::Tensor& running_mean, const at::Tensor& running_var,
                                double eps, const c10::optional<at::Tensor>& residual, bool relu) {
  check_eval_args(input, weight, bias, running_mean, running_var, eps, residual);
  TORCH_CHECK(input.is_cuda(), "fastnn.batch_norm_eval: input must be a CUDA tensor, got ",
              input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  if (input.numel() == 0) {
    return at::empty(input.sizes(), input.options().memory_format(bn_shape(input).format));
  }
  const NormalizeIO io(input, residual);
  const KernelLayout& layout = io.layout;
  const at::Tensor &x = io.x, &res = io.res, &out = io.out;
  const bool has_res = res.defined();
  const at::ScalarType acc = accumulate_type(input.scalar_type());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fastnn_batch_norm_eval_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    AffineParams<acc_t> affine{};
    affine.mean = channel_param(running_mean, acc);
    affine.invstd = channel_param(running_var, acc);
    affine.weight = channel_param(weight, acc);
    affine.bias = channel_param(bias, acc);
    affine.from_var = true;
    affine.eps = static_cast<acc_t>(eps);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = has_res ? res.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = use_vectors(layout, kVec, {xp, rp, op});
    FASTNN_VEC_SWITCH(vec, kVec, V, [&] {
      FASTNN_BOOL_SWITCH(has_res, RES, [&] {
        FASTNN_BOOL_SWITCH(relu, RELU, [&] {
          eval_launch<scalar_t, acc_t, V, RES, RELU>(layout, xp, rp, op, affine);
        });
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input) {
  check_input("fastnn.batch_norm_stats", input);
  TORCH_CHECK(input.is_cuda(), "fastnn.batch_norm_stats: input must be a CUDA tensor, got ",
              input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const BNShape shape = bn_shape(input);
  const at::TensorOptions stat_options =
      input.options().dtype(accumulate_type(input.scalar_type()));
  if (input.numel() == 0) {
    return {at::zeros({shape.C}, stat_options), at::zeros({shape.C}, stat_options)};
  }
  at::Tensor mean = at::empty({shape.C}, stat_options);
  at::Tensor var = at::empty({shape.C}, stat_options);
  const KernelLayout layout = kernel_layout(shape);
  const at::Tensor x = input.contiguous(shape.format);
  const int64_t count = shape.reduce_size();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fastnn_batch_norm_stats_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc_t inv_count = static_cast<acc_t>(1.0 / static_cast<double>(count));
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = use_vectors(layout, kVec, {xp});
    FASTNN_VEC_SWITCH(vec, kVec, V, [&] {
      stats_launch<scalar_t, acc_t, V>(layout, xp, inv_count, mean.data_ptr<acc_t>(),
                                       var.data_ptr<acc_t>(), stat_options);
    });
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_with_stats_cuda(
    const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    double momentum, double eps, const c10::optional<at::Tensor>& residual, bool relu) {
  constexpr const char* kOp = "fastnn.batch_norm_train_with_stats";
  check_train_args(input, weight, bias, running_mean, running_var, momentum, eps, residual);
  check_stat_tensor(kOp, "mean", input, mean);
  check_stat_tensor(kOp, "var", input, var);
  TORCH_CHECK(input.is_cuda(), kOp, ": input must be a CUDA tensor, got ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  if (input.numel() == 0) return empty_batch_train(input);

  const NormalizeIO io(input, residual);
  const KernelLayout& layout = io.layout;
  const at::Tensor &x = io.x, &res = io.res, &out = io.out;
  const bool has_res = res.defined();
  const at::ScalarType acc = accumulate_type(input.scalar_type());
  const at::TensorOptions stat_options = input.options().dtype(acc);
  at::Tensor save_mean = at::empty({io.shape.C}, stat_options);
  at::Tensor save_invstd = at::empty({io.shape.C}, stat_options);
  const int64_t count = io.shape.reduce_size();  // > 1, checked above

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fastnn_batch_norm_train_with_stats_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const AffineParams<acc_t> affine = given_stats_affine<scalar_t, acc_t>(
        mean, var, weight, bias, running_mean, running_var, momentum, eps, count, save_mean,
        save_invstd, stream);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = has_res ? res.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = use_vectors(layout, kVec, {xp, rp, op});
    FASTNN_VEC_SWITCH(vec, kVec, V, [&] {
      FASTNN_BOOL_SWITCH(has_res, RES, [&] {
        FASTNN_BOOL_SWITCH(relu, RELU, [&] {
          eval_launch<scalar_t, acc_t, V, RES, RELU>(layout, xp, rp, op, affine);
        });
      });
    });
  });
  return {out, save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_cat_with_stats_cuda(
    at::TensorList inputs, const at::Tensor& mean, const at::Tensor& var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    double momentum, double eps, bool relu) {
  constexpr const char* kOp = "fastnn.batch_norm_cat_with_stats";
  const at::Tensor probe = check_cat_inputs(kOp, inputs);
  check_train_args(probe, weight, bias, running_mean, running_var, momentum, eps, c10::nullopt);
  check_stat_tensor(kOp, "mean", probe, mean);
  check_stat_tensor(kOp, "var", probe, var);
  TORCH_CHECK(probe.is_cuda(), kOp, ": inputs must be CUDA tensors, got ", probe.device());
  const c10::cuda::CUDAGuard guard(probe.device());
  if (inputs.size() > static_cast<size_t>(kMaxCatInputs)) {
    // More feature maps than one launch takes: normalize their concatenated copy.
    return batch_norm_train_with_stats_cuda(at::cat(inputs, 1), mean, var, weight, bias,
                                            running_mean, running_var, momentum, eps,
                                            c10::nullopt, relu);
  }
  at::Tensor out =
      at::empty(probe.sizes(), probe.options().memory_format(cat_memory_format(inputs)));
  if (out.numel() == 0) {
    auto empty = empty_batch_train(out);
    return {out, std::get<1>(empty), std::get<2>(empty)};
  }
  const BNShape shape = bn_shape(out);
  const KernelLayout layout = kernel_layout(shape);
  std::vector<at::Tensor> xs;
  xs.reserve(inputs.size());
  CatInputs table{};
  table.n = static_cast<int>(inputs.size());
  int64_t c0 = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    xs.push_back(inputs[i].contiguous(shape.format));
    table.ptr[i] = xs.back().data_ptr();
    table.c0[i] = c0;
    c0 += inputs[i].size(1);
  }
  table.c0[inputs.size()] = c0;
  const at::ScalarType acc = accumulate_type(probe.scalar_type());
  const at::TensorOptions stat_options = probe.options().dtype(acc);
  at::Tensor save_mean = at::empty({shape.C}, stat_options);
  at::Tensor save_invstd = at::empty({shape.C}, stat_options);
  const int64_t count = shape.reduce_size();  // > 1, checked above

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(),
                                  "fastnn_batch_norm_cat_with_stats_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const AffineParams<acc_t> affine = given_stats_affine<scalar_t, acc_t>(
        mean, var, weight, bias, running_mean, running_var, momentum, eps, count, save_mean,
        save_invstd, stream);
    scalar_t* op = out.data_ptr<scalar_t>();
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = cat_use_vectors(layout, kVec, table, op);
    FASTNN_VEC_SWITCH(vec, kVec, V, [&] {
      FASTNN_BOOL_SWITCH(relu, RELU, [&] {
        cat_launch<scalar_t, acc_t, V, RELU>(layout, table, op, affine);
      });
    });
  });
  return {out, save_mean, save_invstd};
}

namespace {

using Dual6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// batch_norm_dual, and with `want_mask`, training and relu also the ReLU mask of the output
// (else an empty tensor): (output, mean, invstd, mean2, invstd2, mask).
Dual6 dual_impl(const char* op, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                const c10::optional<at::Tensor>& bias,
                const c10::optional<at::Tensor>& running_mean,
                const c10::optional<at::Tensor>& running_var, const at::Tensor& input2,
                const c10::optional<at::Tensor>& weight2, const c10::optional<at::Tensor>& bias2,
                const c10::optional<at::Tensor>& running_mean2,
                const c10::optional<at::Tensor>& running_var2, bool training, double momentum,
                double eps, double momentum2, double eps2, bool relu, bool want_mask) {
  check_dual_args(input, weight, bias, running_mean, running_var, input2, weight2, bias2,
                  running_mean2, running_var2, training, eps, eps2);
  TORCH_CHECK(input.is_cuda(), op, ": input must be a CUDA tensor, got ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const BNShape shape = bn_shape(input);
  const at::ScalarType acc = accumulate_type(input.scalar_type());
  const at::TensorOptions stat_options = input.options().dtype(acc);
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(shape.format));
  at::Tensor mask = relu_mask_tensor(input, want_mask && training && relu);
  const int64_t C = shape.C;
  if (training && input.numel() == 0) {
    return {out, at::zeros({C}, stat_options), at::zeros({C}, stat_options),
            at::zeros({C}, stat_options), at::zeros({C}, stat_options), mask};
  }
  at::Tensor mean1 = at::empty({C}, stat_options), invstd1 = at::empty({C}, stat_options);
  at::Tensor mean2 = at::empty({C}, stat_options), invstd2 = at::empty({C}, stat_options);
  const KernelLayout layout = kernel_layout(shape);
  const at::Tensor x = input.contiguous(shape.format);
  const at::Tensor z = input2.contiguous(shape.format);
  const int64_t count = shape.reduce_size();  // > 1 in training, checked above

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fastnn_batch_norm_dual_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    DualArgs<scalar_t, acc_t> a{};
    a.layout = layout;
    a.training = training;
    a.x = x.data_ptr<scalar_t>();
    a.z = z.data_ptr<scalar_t>();
    a.out = out.data_ptr<scalar_t>();
    a.mean[0] = mean1.data_ptr<acc_t>();
    a.invstd[0] = invstd1.data_ptr<acc_t>();
    a.mean[1] = mean2.data_ptr<acc_t>();
    a.invstd[1] = invstd2.data_ptr<acc_t>();
    a.affine[0].weight = channel_param(weight, acc);
    a.affine[0].bias = channel_param(bias, acc);
    a.affine[1].weight = channel_param(weight2, acc);
    a.affine[1].bias = channel_param(bias2, acc);
    a.inv_count = static_cast<acc_t>(1.0 / static_cast<double>(std::max<int64_t>(count, 1)));
    a.eps[0] = static_cast<acc_t>(eps);
    a.eps[1] = static_cast<acc_t>(eps2);
    a.stat_options = stat_options;
    if (training) {
      a.running[0] = running_update<acc_t>(running_mean, running_var, acc, momentum, count);
      a.running[1] = running_update<acc_t>(running_mean2, running_var2, acc, momentum2, count);
    } else if (C > 0) {
      // The statistics the inputs are normalized with: the running ones, returned as mean and
      // 1 / sqrt(var + eps) like the CPU kernel's.
      launch_given_stats<scalar_t, acc_t>(channel_param(running_mean, acc),
                                          channel_param(running_var, acc), C, eps, a.mean[0],
                                          a.invstd[0], RunningUpdate<acc_t>{}, stream);
      launch_given_stats<scalar_t, acc_t>(channel_param(running_mean2, acc),
                                          channel_param(running_var2, acc), C, eps2, a.mean[1],
                                          a.invstd[1], RunningUpdate<acc_t>{}, stream);
    }
    if (input.numel() == 0) return;
    a.mask = mask.numel() > 0 ? mask.data_ptr<uint8_t>() : nullptr;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = use_vectors(layout, kVec, {a.x, a.z, a.out});
    FASTNN_VEC_SWITCH(vec, kVec, V, [&] {
      FASTNN_BOOL_SWITCH(relu, RELU, [&] {
        FASTNN_BOOL_SWITCH(a.mask != nullptr, WANT, [&] {
          constexpr bool kMask = WANT && RELU && V > 1;
          if (layout.rows) {
            dual_launch<scalar_t, acc_t, V, RELU, true, kMask>(a);
          } else {
            dual_launch<scalar_t, acc_t, V, RELU, false, kMask>(a);
          }
        });
      });
    });
    if (a.mask != nullptr && !vec) relu_mask_from_output(layout, a.out, a.mask);
  });
  return {out, mean1, invstd1, mean2, invstd2, mask};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_dual_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const at::Tensor& input2,
    const c10::optional<at::Tensor>& weight2, const c10::optional<at::Tensor>& bias2,
    const c10::optional<at::Tensor>& running_mean2, const c10::optional<at::Tensor>& running_var2,
    bool training, double momentum, double eps, double momentum2, double eps2, bool relu) {
  auto [out, mean, invstd, mean2, invstd2, mask] =
      dual_impl("fastnn.batch_norm_dual", input, weight, bias, running_mean, running_var, input2,
                weight2, bias2, running_mean2, running_var2, training, momentum, eps, momentum2,
                eps2, relu, false);
  return {out, mean, invstd, mean2, invstd2};
}

Dual6 batch_norm_dual_masked_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const at::Tensor& input2,
    const c10::optional<at::Tensor>& weight2, const c10::optional<at::Tensor>& bias2,
    const c10::optional<at::Tensor>& running_mean2, const c10::optional<at::Tensor>& running_var2,
    bool training, double momentum, double eps, double momentum2, double eps2, bool relu) {
  return dual_impl("fastnn.batch_norm_dual_masked", input, weight, bias, running_mean,
                   running_var, input2, weight2, bias2, running_mean2, running_var2, training,
                   momentum, eps, momentum2, eps2, relu, true);
}

}  // namespace cuda
}  // namespace fastnn
