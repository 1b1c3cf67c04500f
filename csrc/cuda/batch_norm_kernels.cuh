// Device code of fastnn's CUDA batch norm: statistics, normalize, backward. Host code (argument
// checks, layout planning, launches) lives in batch_norm_launch.cuh and the .cu files.
//
// Every kernel sees the input as one of two layouts (see KernelLayout in batch_norm_launch.cuh):
//
//   planes (NCHW):       element (n, c, s) at (n * C + c) * S + s. A block works on one channel
//                        (blockIdx.x); each warp walks "rows" = (plane n, segment of S), the lanes
//                        reading consecutive 16-byte vectors of that channel (scalar head/tail);
//                        a warp takes 2 or 4 rows at once when the planes are small.
//   rows (NHWC, 2-D):    element (r, c) at r * C + c with r = n * S + s. A block is (tx, ty)
//                        threads: tx lanes cover tx * V consecutive channels, ty threads walk rows.
//
// Both use gridDim.y blocks per channel group so that a few channels still fill the GPU. Each
// reducing block writes one partial per channel ([field][block][channel]); a finalize kernel
// merges the partials of a channel in a fixed order, so results are bitwise reproducible (no
// floating-point atomics anywhere).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>
#if defined(__CUDACC__)
#include <cooperative_groups.h>
#endif

#include <cstdint>
#include <type_traits>

namespace fastnn {
namespace cuda {

constexpr int kThreads = 512;            // threads per block of every streaming kernel
constexpr int kWarps = kThreads / 32;    // warps per block
constexpr int kUnroll = 4;               // vectors each thread has in flight per loop step
constexpr int kMinBlocks = 2;            // forward streaming kernels: blocks per SM to fit
constexpr int kFinalizeThreads = 512;    // finalize kernels: threads per block (merge_partials)

// ---------------------------------------------------------------------------------------------
// Geometry (plain structs filled on the host, passed by value).

// planes layout: per channel, `rows` = N * segs rows of at most seg_len elements, each walked
// by `lanes` consecutive lanes of a warp (8, 16 or 32: 32 / lanes rows per warp at once).
struct PlaneGeom {
  int64_t N;        // planes per channel
  int64_t C;        // channels
  int64_t S;        // elements per plane
  int64_t segs;     // segments per plane
  int64_t seg_len;  // elements per segment (the last one may be shorter)
  int64_t rows;     // N * segs
  int lanes;        // lanes per row
};

// rows layout: R rows of C channels, Cv = C / V channel vectors per row.
struct RowGeom {
  int64_t R;
  int64_t C;
  int64_t Cv;
};

// The on-chip training forward and backward (bn_train_onchip_rows_kernel,
// bn_backward_onchip_rows_kernel): rows layout, one block of
// (tx, kThreads / tx) threads per resident slot, tx a power of two covering the Cv <= 32 channel
// vectors. Block b owns rows [b * per_block, (b + 1) * per_block) (fewer at the end) and keeps
// the first `cached` of them (0, or a multiple of kThreads / tx) in shared memory.
struct OnchipGeom {
  int64_t R;
  int64_t C;
  int64_t Cv;
  int64_t per_block;
  int64_t cached;
  int lanes;  // partial lanes of its finalize step (a power of two; see plan_onchip)
};

// Their dynamic shared memory: the cached rows (cached * C elements; the backward keeps two
// tensors' rows), then 2 * C (forward) or 3 * C (backward) per-channel values and
// onchip_scratch(V, tx) reduction values, in the accumulation type.
__host__ __device__ constexpr int64_t onchip_scratch(int64_t V, int64_t tx) {
  return 3 * (V * (kThreads / 32) * tx > kFinalizeThreads ? V * (kThreads / 32) * tx
                                                           : kFinalizeThreads);
}

// Where the statistics shift of a channel is sampled: element c * cstride + off[k] of the input,
// k < 3 (the channel's first element, one in the middle, its last; see channel_shift).
struct ShiftSamples {
  int64_t cstride;
  int64_t off[3];
};

// A per-channel tensor ([C], any stride) read as the accumulation type. It has either the
// accumulation dtype (is_acc) or the input's dtype; a null pointer reads as the default value.
struct ChannelParam {
  const void* ptr = nullptr;
  int64_t stride = 1;
  bool is_acc = true;
};

// A running statistic updated in place, same convention as ChannelParam.
struct RunningStat {
  void* ptr = nullptr;
  int64_t stride = 1;
  bool is_acc = true;
};

// What normalize needs per channel: y = (x - mean) * invstd * weight + bias. In training mean and
// invstd are the batch statistics; in eval `invstd` holds the running variance (from_var) and
// the kernel computes 1 / sqrt(var + eps).
template <typename acc_t>
struct AffineParams {
  ChannelParam mean;
  ChannelParam invstd;
  ChannelParam weight;
  ChannelParam bias;
  bool from_var;
  acc_t eps;
};

template <typename acc_t>
struct RunningUpdate {
  RunningStat mean;
  RunningStat var;
  acc_t momentum;            // m
  acc_t one_minus_momentum;  // 1 - m
  acc_t momentum_unbiased;   // m * n / (n - 1)
};

// ---------------------------------------------------------------------------------------------
// Cooperative launches (the on-chip kernels). The CPU emulation of the tests
// (tests/cuda_emu/emu.h) has its own grid_sync and dynamic_shared.

#if defined(__CUDACC__)
// The grid-wide barrier of a kernel launched with cudaLaunchCooperativeKernel.
__device__ __forceinline__ void grid_sync() { cooperative_groups::this_grid().sync(); }

// The block's dynamic shared memory (the launch's shared-memory size), 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char fastnn_dynamic_shared[];
  return reinterpret_cast<T*>(fastnn_dynamic_shared);
}
#endif

// ---------------------------------------------------------------------------------------------
// Small helpers.

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// V consecutive elements as the accumulation type; `p` is aligned to sizeof(T) * V.
template <int V, typename T, typename acc_t>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, acc_t (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = static_cast<acc_t>(pk.v[i]);
}

template <int V, typename T>
__device__ __forceinline__ void load_raw(const T* __restrict__ p, T (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = pk.v[i];
}

template <int V, typename T>
__device__ __forceinline__ void store_raw(T* __restrict__ p, const T (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) pk.v[i] = in[i];
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// V consecutive elements loaded with one access (`p` aligned to sizeof(T) * V) and read one at a
// time in the accumulation type. bfloat16 is held in 32-bit words and widened by a shift or a
// mask (exactly what the conversion does): as 16-bit values the compiler split each load into
// halves, which spilled in the rows statistics kernel.
template <typename T, int V, bool WORDS = std::is_same_v<T, c10::BFloat16> && V % 2 == 0>
struct Loaded {
  Pack<T, V> pk;
  __device__ __forceinline__ void load(const T* __restrict__ p) {
    pk = *reinterpret_cast<const Pack<T, V>*>(p);
  }
  __device__ __forceinline__ void store(T* __restrict__ p) const {
    *reinterpret_cast<Pack<T, V>*>(p) = pk;
  }
  template <typename acc_t>
  __device__ __forceinline__ acc_t get(int i) const {
    return static_cast<acc_t>(pk.v[i]);
  }
};

template <typename T, int V>
struct Loaded<T, V, true> {
  struct alignas(sizeof(T) * V) Words {
    uint32_t w[V / 2];
  } words;
  __device__ __forceinline__ void load(const T* __restrict__ p) {
    words = *reinterpret_cast<const Words*>(p);
  }
  __device__ __forceinline__ void store(T* __restrict__ p) const {
    *reinterpret_cast<Words*>(p) = words;
  }
  template <typename acc_t>
  __device__ __forceinline__ acc_t get(int i) const {
    const uint32_t w = words.w[i / 2];  // element 2k in the low half (little-endian)
    return static_cast<acc_t>(__uint_as_float(i % 2 == 0 ? w << 16 : w & 0xffff0000u));
  }
};

__device__ __forceinline__ float rsqrt_acc(float x) { return rsqrtf(x); }
__device__ __forceinline__ double rsqrt_acc(double x) { return 1.0 / sqrt(x); }

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_param(const ChannelParam& p, int64_t c, acc_t dflt) {
  if (p.ptr == nullptr) return dflt;
  if (p.is_acc) return static_cast<const acc_t*>(p.ptr)[c * p.stride];
  return static_cast<acc_t>(static_cast<const scalar_t*>(p.ptr)[c * p.stride]);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_running(const RunningStat& s, int64_t c, acc_t v) {
  if (s.ptr == nullptr) return;
  if (s.is_acc) {
    static_cast<acc_t*>(s.ptr)[c * s.stride] = v;
  } else {
    static_cast<scalar_t*>(s.ptr)[c * s.stride] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_running(const RunningStat& s, int64_t c) {
  if (s.is_acc) return static_cast<const acc_t*>(s.ptr)[c * s.stride];
  return static_cast<acc_t>(static_cast<const scalar_t*>(s.ptr)[c * s.stride]);
}

// running = (1 - momentum) * running + momentum * batch, the variance's batch value unbiased
// (momentum_unbiased); either running tensor may be absent.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void update_running(const RunningUpdate<acc_t>& ru, int64_t c,
                                               acc_t mean, acc_t var) {
  if (ru.mean.ptr != nullptr) {
    const acc_t rm = load_running<scalar_t, acc_t>(ru.mean, c);
    store_running<scalar_t>(ru.mean, c, mean * ru.momentum + rm * ru.one_minus_momentum);
  }
  if (ru.var.ptr != nullptr) {
    const acc_t rv = load_running<scalar_t, acc_t>(ru.var, c);
    store_running<scalar_t>(ru.var, c, var * ru.momentum_unbiased + rv * ru.one_minus_momentum);
  }
}

// mean, scale = invstd * weight, shift = bias of channel c.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void channel_affine(const AffineParams<acc_t>& p, int64_t c,
                                               acc_t& mean, acc_t& scale, acc_t& shift) {
  mean = load_param<scalar_t>(p.mean, c, acc_t(0));
  acc_t invstd = load_param<scalar_t>(p.invstd, c, acc_t(1));
  if (p.from_var) invstd = rsqrt_acc(invstd + p.eps);
  scale = invstd * load_param<scalar_t>(p.weight, c, acc_t(1));
  shift = load_param<scalar_t>(p.bias, c, acc_t(0));
}

// The term added to a normalized value: the residual as it is or, for batch_norm_dual, the
// second input normalized with its own mean and scale, (z - mean) * scale, in the accumulation
// dtype (its bias is added to the first batch norm's shift). Set only for DUAL.
template <typename acc_t, bool DUAL>
struct ResidualTerm {
  acc_t mean = acc_t(0);
  acc_t scale = acc_t(1);
  template <typename scalar_t>
  __device__ __forceinline__ acc_t operator()(scalar_t r) const {
    const acc_t v = static_cast<acc_t>(r);
    if constexpr (DUAL) return (v - mean) * scale;
    return v;
  }
};

// channel_affine of the second batch norm of a DUAL normalize: its bias joins `shift`.
template <typename scalar_t, typename acc_t, bool DUAL>
__device__ __forceinline__ void second_affine(const AffineParams<acc_t>& p2, int64_t c,
                                              ResidualTerm<acc_t, DUAL>& term, acc_t& shift) {
  acc_t shift2;
  channel_affine<scalar_t>(p2, c, term.mean, term.scale, shift2);
  shift += shift2;
}

// [relu]((x - mean) * scale + shift [+ residual]), rounded once to the output dtype; `residual`
// is already in the accumulation dtype.
template <bool RES, bool RELU, typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t normalize_one(acc_t x, acc_t mean, acc_t scale, acc_t shift,
                                                  acc_t residual) {
  acc_t y = (x - mean) * scale + shift;
  if constexpr (RES) y += residual;
  if constexpr (RELU) y = y < acc_t(0) ? acc_t(0) : y;  // keeps NaN, like torch.relu
  return static_cast<scalar_t>(y);
}

// Whether the ReLU passes the gradient at an output value: not where output <= 0; a NaN output
// passes it, as torch's ReLU backward (threshold_backward) does.
template <typename scalar_t>
__device__ __forceinline__ bool relu_passes(scalar_t out) {
  // Compare in double for double (a float cast would flush tiny positive values to zero).
  using cmp_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  return !(static_cast<cmp_t>(out) <= cmp_t(0));
}

// relu_passes of a ReLU's output (never below zero: +-0, positive, +Inf or NaN): any bit but
// the sign set. For 16-bit values a test of their bits, with no conversion to float.
template <typename scalar_t>
__device__ __forceinline__ bool relu_output_passes(scalar_t out) {
  if constexpr (sizeof(scalar_t) == 2) {
    return (out.x & 0x7fffu) != 0;
  } else {
    return relu_passes(out);
  }
}

// grad_output masked by the ReLU when RELU.
template <bool RELU, typename scalar_t>
__device__ __forceinline__ scalar_t masked_grad(scalar_t g, scalar_t out) {
  if constexpr (RELU) {
    return relu_passes(out) ? g : static_cast<scalar_t>(0.0f);
  } else {
    return g;
  }
}

// The ReLU mask of the training backward (BITS in the kernels below): the reduce pass writes, for
// each V-wide vector it reads (V > 1) at element offset e (a multiple of V), one byte at e / V
// whose bit i says whether the gradient passes at element e + i; the dx pass, launched with the
// same plan, reads that byte instead of V output values. Scalar accesses (the head and tail of
// a planes row) write nothing and read the output as before. The dx pass then reads N / V bytes
// of mask in place of N output values: 1/16 of their bytes for every dtype (16 / sizeof = V).
//
// The training forward can write the same mask (MASK in the normalize kernels below): then the
// reduce pass reads it too (kBitsRead) instead of the output's vectors, and writes nothing.
constexpr int kBitsNone = 0;   // no mask: the output's values
constexpr int kBitsWrite = 1;  // the reduce pass writes the mask from the output
constexpr int kBitsRead = 2;   // the reduce pass reads the forward's mask

// Element i's value of a thread's per-channel array: a planes kernel works on one channel (NC ==
// 1, the channel of every element of its vectors), a rows kernel on V (NC == V, element i of a
// vector is the thread's channel i).
template <typename T, int NC>
__device__ __forceinline__ T& lane(T (&a)[NC], int i) {
  return a[NC == 1 ? 0 : i];
}

// ---------------------------------------------------------------------------------------------
// Welford / Chan statistics.

template <typename T>
struct Welford {
  T mean;
  T m2;  // sum of squared deviations from mean
  T n;   // count (exact while below 2^24 in float32; only a weight beyond that)
};

// The means are merged as a weighted sum, not as a.mean + delta * r: a channel holding +-Inf keeps
// the mean +-Inf (as torch's is) instead of turning it into Inf - Inf = NaN at the next merge.
template <typename T>
__device__ __forceinline__ Welford<T> welford_merge(const Welford<T>& a, const Welford<T>& b) {
  if (b.n == T(0)) return a;
  if (a.n == T(0)) return b;
  const T n = a.n + b.n;
  const T inv = T(1) / n;
  const T delta = b.mean - a.mean;
  const T r = b.n * inv;
  return {a.mean * (a.n * inv) + b.mean * r, a.m2 + b.m2 + delta * delta * a.n * r, n};
}

// Adds V values of one channel: their own mean and M2 first, then one Chan merge.
template <int V, typename T>
__device__ __forceinline__ void welford_add(Welford<T>& w, const T (&x)[V]) {
  if constexpr (V == 1) {
    const T n0 = w.n;
    w.n += T(1);
    const T delta = x[0] - w.mean;
    const T inv = T(1) / w.n;
    w.mean = w.mean * (n0 * inv) + x[0] * inv;  // weighted, as in welford_merge
    w.m2 += delta * (x[0] - w.mean);
  } else {
    T s = T(0);
#pragma unroll
    for (int i = 0; i < V; ++i) s += x[i];
    const T cm = s * (T(1) / T(V));
    T c2 = T(0);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const T d = x[i] - cm;
      c2 += d * d;
    }
    const T n = w.n + T(V);
    const T inv = T(1) / n;
    const T delta = cm - w.mean;
    const T r = T(V) * inv;
    w.mean = w.mean * (w.n * inv) + cm * r;  // weighted, as in welford_merge
    w.m2 += c2 + delta * delta * w.n * r;
    w.n = n;
  }
}

template <typename T>
__device__ __forceinline__ Welford<T> shfl_down(const Welford<T>& w, int off) {
  return {__shfl_down_sync(0xffffffffu, w.mean, off), __shfl_down_sync(0xffffffffu, w.m2, off),
          __shfl_down_sync(0xffffffffu, w.n, off)};
}

// Merges lanes (lane + k * min_off) of the warp into lanes [0, min_off), in a fixed tree order.
template <typename T>
__device__ __forceinline__ Welford<T> warp_reduce(Welford<T> w, int min_off) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    if (off < min_off) break;
    w = welford_merge(w, shfl_down(w, off));
  }
  return w;
}

// Plain sums (backward): two values per channel.
template <typename T>
struct Sum2 {
  T a;
  T b;
};

template <typename T>
__device__ __forceinline__ Sum2<T> warp_reduce(Sum2<T> s, int min_off) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    if (off < min_off) break;
    s.a += __shfl_down_sync(0xffffffffu, s.a, off);
    s.b += __shfl_down_sync(0xffffffffu, s.b, off);
  }
  return s;
}

template <typename T>
__device__ __forceinline__ Welford<T> combine(const Welford<T>& a, const Welford<T>& b) {
  return welford_merge(a, b);
}
template <typename T>
__device__ __forceinline__ Sum2<T> combine(const Sum2<T>& a, const Sum2<T>& b) {
  return {a.a + b.a, a.b + b.b};
}

// The dual backward's sums: sum g, sum g * (x - mean), sum g * (z - mean2).
template <typename T>
struct Sum3 {
  T a;
  T b;
  T c;
};

template <typename T>
__device__ __forceinline__ Sum3<T> warp_reduce(Sum3<T> s, int min_off) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    if (off < min_off) break;
    s.a += __shfl_down_sync(0xffffffffu, s.a, off);
    s.b += __shfl_down_sync(0xffffffffu, s.b, off);
    s.c += __shfl_down_sync(0xffffffffu, s.c, off);
  }
  return s;
}

template <typename T>
__device__ __forceinline__ Sum3<T> combine(const Sum3<T>& a, const Sum3<T>& b) {
  return {a.a + b.a, a.b + b.b, a.c + b.c};
}

template <typename T>
struct Fields;
template <typename T>
struct Fields<Welford<T>> {
  static constexpr int count = 3;
  using type = T;
  __device__ static void put(T* f, int64_t stride, const Welford<T>& w) {
    f[0] = w.mean;
    f[stride] = w.m2;
    f[2 * stride] = w.n;
  }
  __device__ static Welford<T> get(const T* f, int64_t stride) {
    return {f[0], f[stride], f[2 * stride]};
  }
  __device__ static Welford<T> zero() { return {T(0), T(0), T(0)}; }
};
template <typename T>
struct Fields<Sum2<T>> {
  static constexpr int count = 2;
  using type = T;
  __device__ static void put(T* f, int64_t stride, const Sum2<T>& s) {
    f[0] = s.a;
    f[stride] = s.b;
  }
  __device__ static Sum2<T> get(const T* f, int64_t stride) { return {f[0], f[stride]}; }
  __device__ static Sum2<T> zero() { return {T(0), T(0)}; }
};
template <typename T>
struct Fields<Sum3<T>> {
  static constexpr int count = 3;
  using type = T;
  __device__ static void put(T* f, int64_t stride, const Sum3<T>& s) {
    f[0] = s.a;
    f[stride] = s.b;
    f[2 * stride] = s.c;
  }
  __device__ static Sum3<T> get(const T* f, int64_t stride) {
    return {f[0], f[stride], f[2 * stride]};
  }
  __device__ static Sum3<T> zero() { return {T(0), T(0), T(0)}; }
};

// Whole-block reduction of one value per thread (planes layout, 1-D block of kThreads); the
// result is valid in thread 0.
template <typename R>
__device__ __forceinline__ R block_reduce_all(R v) {
  using F = Fields<R>;
  using T = typename F::type;
  __shared__ T sm[F::count * kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_reduce(v, 1);
  if (lane == 0) F::put(sm + warp, kWarps, v);
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? F::get(sm + lane, kWarps) : F::zero();
    v = warp_reduce(v, 1);
  }
  return v;
}

// Column reduction for the rows layout: block (tx, ty), tx a power of two <= 32, one value per
// thread for the channel vector lane threadIdx.x; reduces over threadIdx.y. The result is valid in
// the threads with threadIdx.y == 0. Call from every thread of the block.
template <typename R>
__device__ __forceinline__ R block_reduce_columns(R v) {
  using F = Fields<R>;
  using T = typename F::type;
  __shared__ T sm[F::count * kWarps * 32];
  const int tx = blockDim.x;
  const int tid = threadIdx.y * tx + threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  v = warp_reduce(v, tx);
  // With tx < 32 a warp spans 32 / tx rows and its lanes [0, tx) now hold the warp's sums; with
  // tx == 32 each warp is one row.
  if (lane < tx) F::put(sm + warp * 32 + lane, kWarps * 32, v);
  __syncthreads();
  if (tid < tx) {
    v = F::get(sm + tid, kWarps * 32);
    for (int w = 1; w < kWarps; ++w) v = combine(v, F::get(sm + w * 32 + tid, kWarps * 32));
  }
  __syncthreads();  // sm is reused by the next call
  return v;
}

// block_reduce_columns_vec with its scratch given: `sm` holds Fields<R>::count fields of
// V * kWarps rows of `row` values (row >= blockDim.x; a power of two or 32).
template <int V, typename R, typename T>
__device__ __forceinline__ bool block_reduce_columns_vec_in(const R (&v)[V], R& out, int& x,
                                                           int& i, T* sm, int row) {
  using F = Fields<R>;
  const int field = V * kWarps * row;
  const int tx = blockDim.x;
  const int tid = threadIdx.y * tx + threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const R r = warp_reduce(v[k], tx);
    if (lane < tx) F::put(sm + (k * kWarps + warp) * row + lane, field, r);
  }
  __syncthreads();
  if (tid >= tx * V) return false;
  i = tid / tx;
  x = tid - i * tx;
  const T* col = sm + i * kWarps * row + x;
  out = F::get(col, field);
  for (int w = 1; w < kWarps; ++w) out = combine(out, F::get(col + w * row, field));
  return true;
}

// block_reduce_columns of a thread's V channels at once, for Welford states, whose merges take a
// division each: V calls one after the other were V chains of kWarps - 1 dependent merges (and
// 2V barriers); here V * tx threads run one chain each, in the same order (bitwise the same
// results). Returns true in the thread that holds channel i of column x's vector, with the
// result in `out`. Call once per kernel, from every thread of the block. Not used by the
// backward's reduce kernels (the on-chip backward uses it): their merges are additions, and
// those kernels, which have no block bound, took other register counts with it (one of them
// 64 -> 70, i.e. 1 block of 512 threads per multiprocessor instead of 2).
template <int V, typename R>
__device__ __forceinline__ bool block_reduce_columns_vec(const R (&v)[V], R& out, int& x, int& i) {
  using F = Fields<R>;
  using T = typename F::type;
  __shared__ T sm[F::count * V * kThreads];  // V * kWarps rows of 32
  return block_reduce_columns_vec_in<V>(v, out, x, i, sm, 32);
}

// A finalize kernel's merge of each channel's partials ([field][P][C]). Block (X, Y), X * Y ==
// kFinalizeThreads: X channels, Y partial lanes (a power of two the host picks from P, see
// finalize_block). Thread (x, y) merges partials y, y + Y, ... in order, loading 4 before merging
// them; then the Y lanes are merged as a tree in shared memory. The shape depends on P only, so
// results are bitwise reproducible. The result is valid in the threads with y == 0; call from
// every thread of the block. merge_partials_in takes the thread's place (x, y) in the X x Y shape
// and the scratch (Fields<R>::count * kFinalizeThreads values); merge_partials is the finalize
// kernels' form, with the block's own shape.
template <typename R, typename T>
__device__ __forceinline__ R merge_partials_in(const T* __restrict__ partial, int64_t P, int64_t C,
                                               int64_t c, int x, int y, int X, int Y, T* sm) {
  using F = Fields<R>;
  R v = F::zero();
  if (c < C) {
    const int64_t field = P * C;
    const int np = static_cast<int>(P);  // at most kMaxGridY
    int p = y;
    for (; p + 3 * Y < np; p += 4 * Y) {
      R q[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) q[k] = F::get(partial + (p + k * Y) * C + c, field);
#pragma unroll
      for (int k = 0; k < 4; ++k) v = combine(v, q[k]);
    }
    for (; p < np; p += Y) v = combine(v, F::get(partial + p * C + c, field));
  }
  const int t = y * X + x;
  F::put(sm + t, kFinalizeThreads, v);
  __syncthreads();
  // Level h: lanes y < h take in lane y + h (not written at this level).
  for (int h = Y / 2; h > 0; h /= 2) {
    if (y < h) {
      v = combine(v, F::get(sm + t + h * X, kFinalizeThreads));
      F::put(sm + t, kFinalizeThreads, v);
    }
    __syncthreads();
  }
  return v;
}

template <typename R, typename T>
__device__ __forceinline__ R merge_partials(const T* __restrict__ partial, int64_t P, int64_t C,
                                            int64_t c) {
  __shared__ T sm[Fields<R>::count * kFinalizeThreads];
  return merge_partials_in<R>(partial, P, C, c, threadIdx.x, threadIdx.y, blockDim.x,
                              blockDim.y, sm);
}

// ---------------------------------------------------------------------------------------------
// Iteration. `f(std::integral_constant<int, U>, [std::integral_constant<int, W>,] offset, step)`
// handles U vectors of W elements at element offsets offset + u * step, u < U (U == kUnroll in
// the body, 1 in the tail), so that its loads can all be issued before the arithmetic. REVERSE
// walks the same elements in the opposite order: a pass right after a reduction over the same
// data then starts with what is still in L2.

// planes layout: a row is a segment of one plane, walked by g.lanes lanes (a whole warp, or a
// quarter or half of one for small planes, so that a 7x7 plane does not leave most of a warp
// idle). With V > 1 (every base pointer 16-byte aligned) a row is read as a scalar head up to
// the first V-aligned element, whole vectors of V, and a scalar tail, so planes of any size and
// offset get 16-byte accesses; W says which. Head and tail have fewer than V <= 8 <= g.lanes
// elements: one access per lane at most.
//
// g(std::integral_constant<int, rest>()) for 0 < rest <= R (nothing for rest == 0).
template <int R, typename G>
__device__ __forceinline__ void with_steps(int rest, G&& g) {
  if constexpr (R > 0) {
    if (rest == R) {
      g(std::integral_constant<int, R>());
    } else {
      with_steps<R - 1>(rest, g);
    }
  }
}

// for_each_plane_row_to also gives f the distance from the input's element to the output's when
// the output has out_C channels and channel c of the input is channel out_c of the output
// (batch_norm_cat_with_stats); it is constant along a row, and the host makes it a multiple of V
// whenever V > 1 so that the output's vectors are aligned as the input's are.
template <int V, bool REVERSE, int U = kUnroll, typename F>
__device__ __forceinline__ void for_each_plane_row_to(const PlaneGeom& g, int64_t c, int64_t out_C,
                                                      int64_t out_c, F&& f) {
  using One = std::integral_constant<int, 1>;
  using Vec = std::integral_constant<int, V>;
  using Unroll = std::integral_constant<int, U>;
  const int lanes = g.lanes;
  const int lane = threadIdx.x & (lanes - 1);
  const int64_t per_block = kThreads / lanes;  // rows a block walks at once
  const int64_t first = static_cast<int64_t>(blockIdx.y) * per_block + threadIdx.x / lanes;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * per_block;
  if (first >= g.rows) return;
  const int64_t count = (g.rows - 1 - first) / stride + 1;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t row = first + (REVERSE ? count - 1 - k : k) * stride;
    int64_t n = row, seg = 0;
    if (g.segs != 1) {
      n = row / g.segs;
      seg = row - n * g.segs;
    }
    const int64_t begin = seg * g.seg_len;
    const int len = static_cast<int>(g.seg_len < g.S - begin ? g.seg_len : g.S - begin);
    const int64_t base = (n * g.C + c) * g.S + begin;
    const int64_t yd = (n * out_C + out_c) * g.S + begin - base;
    // Rows of fewer than 32 lanes have at most 16 units, one per lane at most: the unrolled
    // steps are a whole warp's, with a constant stride (addresses as immediate offsets). What a
    // lane has left after them (fewer than U) is one step too, so that its loads are in flight
    // together: a 28x28 float16 plane (98 vectors) is one step of 3 for most lanes, where it was
    // three steps of 1, one after the other.
    if constexpr (V == 1) {
      int i = lane;
      if (lanes == 32) {
        for (; i + 32 * (U - 1) < len; i += 32 * U) f(Unroll(), One(), base + i, 32, yd);
        const int rest = i < len ? (len - 1 - i) / 32 + 1 : 0;
        with_steps<U - 1>(rest, [&](auto r) { f(r, One(), base + i, 32, yd); });
      } else {
        for (; i < len; i += lanes) f(One(), One(), base + i, 32, yd);
      }
    } else {
      const int mis = static_cast<int>(base % V);
      const int head = mis == 0 ? 0 : (V - mis < len ? V - mis : len);
      const int nvec = (len - head) / V;
      const int tail = head + nvec * V;
      if (lane < head) f(One(), One(), base + lane, 0, yd);
      const int64_t vbase = base + head;
      constexpr int64_t step = 32 * V;
      int i = lane;
      if (lanes == 32) {
        for (; i + 32 * (U - 1) < nvec; i += 32 * U) {
          f(Unroll(), Vec(), vbase + static_cast<int64_t>(i) * V, step, yd);
        }
        const int rest = i < nvec ? (nvec - 1 - i) / 32 + 1 : 0;
        with_steps<U - 1>(rest, [&](auto r) {
          f(r, Vec(), vbase + static_cast<int64_t>(i) * V, step, yd);
        });
      } else {
        for (; i < nvec; i += lanes) f(One(), Vec(), vbase + static_cast<int64_t>(i) * V, step, yd);
      }
      if (lane < len - tail) f(One(), One(), base + tail + lane, 0, yd);
    }
  }
}

template <int V, bool REVERSE, int U = kUnroll, typename F>
__device__ __forceinline__ void for_each_plane_row(const PlaneGeom& g, int64_t c, F&& f) {
  for_each_plane_row_to<V, REVERSE, U>(
      g, c, g.C, c, [&](auto u, auto width, int64_t off, int64_t step, int64_t) {
        f(u, width, off, step);
      });
}

// rows layout. for_each_row_to also gives f the output's offset and step when the output has
// out_C channels per row and the thread's first input channel is the output's out_col. U rows per
// step (kUnroll unless the kernel says otherwise). What a thread has left after its whole steps
// (fewer than U rows): with U > kUnroll (the 16-bit statistics pass, 8 rows a step) one more
// step, as in the planes layout, so that their loads are in flight together: at 64 channels a
// thread walks only tens of rows, and up to 7 left over one at a time were 4 memory latencies
// back to back (nvcc pairs them), after 5 or 6 whole steps. With U <= kUnroll the rows one at a
// time (at most 3: two round trips); as one step they made several kernels spill inside their
// main loop (ptxas, sm_90: the float32 BN+add+ReLU normalize writing the mask, the 16-bit
// BN+add normalize).
template <int V, bool REVERSE, int U = kUnroll, typename F>
__device__ __forceinline__ void for_each_row_to(const RowGeom& g, int64_t cv, int64_t out_C,
                                                int64_t out_col, F&& f) {
  const int64_t first = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  if (first >= g.R) return;
  const int64_t count = (g.R - 1 - first) / stride + 1;
  const int64_t col = cv * V;
  const int64_t step = stride * g.C;
  const int64_t ystep = stride * out_C;
  using Unroll = std::integral_constant<int, U>;
  using One = std::integral_constant<int, 1>;
  if (!REVERSE) {
    int64_t k = 0;
    int64_t off = first * g.C + col;
    int64_t yoff = first * out_C + out_col;
    for (; k + U <= count; k += U, off += U * step, yoff += U * ystep) {
      f(Unroll(), off, step, yoff, ystep);
    }
    if constexpr (U > kUnroll) {
      with_steps<U - 1>(static_cast<int>(count - k), [&](auto r) { f(r, off, step, yoff, ystep); });
    } else {
      for (; k < count; ++k, off += step, yoff += ystep) f(One(), off, step, yoff, ystep);
    }
  } else {
    // Last row first; a group of U rows is visited from its lowest row, the groups from the top,
    // and the rest (the lowest rows) last.
    int64_t remaining = count;
    for (; remaining >= U; remaining -= U) {
      const int64_t r = first + (remaining - U) * stride;
      f(Unroll(), r * g.C + col, step, r * out_C + out_col, ystep);
    }
    if constexpr (U > kUnroll) {
      with_steps<U - 1>(static_cast<int>(remaining), [&](auto r) {
        f(r, first * g.C + col, step, first * out_C + out_col, ystep);
      });
    } else {
      for (; remaining > 0; --remaining) {
        const int64_t r = first + (remaining - 1) * stride;
        f(One(), r * g.C + col, step, r * out_C + out_col, ystep);
      }
    }
  }
}

template <int V, bool REVERSE, int U = kUnroll, typename F>
__device__ __forceinline__ void for_each_row(const RowGeom& g, int64_t cv, F&& f) {
  for_each_row_to<V, REVERSE, U>(g, cv, g.C, cv * V,
                                 [&](auto u, int64_t off, int64_t step, int64_t, int64_t) {
                                   f(u, off, step);
                                 });
}

// ---------------------------------------------------------------------------------------------
// Training forward, step 1: per-block Welford partials. partial = [3][gridDim.y][C].
// Statistics are taken of x - shift, with shift a value of the channel, so that a large mean (1e4
// with std 1, say) costs no float32 precision in the running sums; the finalize kernel adds the
// shift back. The float32 error of the mean grows with |shift - mean| / std: a shift taken from a
// single element costs 1e-3 std when that element is an outlier 2000 std from the mean (the first
// element of a channel, say). So the shift is the median of three elements (the channel's first,
// middle and last), which one outlier cannot move far.

template <typename acc_t>
__device__ __forceinline__ acc_t finite_or_zero(acc_t v) {
  // A non-finite shift would make every shifted value NaN (x - Inf), where torch's mean is
  // +-Inf: such a sample counts as 0.
  return isfinite(v) ? v : acc_t(0);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t channel_shift(const scalar_t* __restrict__ x, int64_t c,
                                               const ShiftSamples& s) {
  const scalar_t* p = x + c * s.cstride;
  const acc_t a = finite_or_zero(static_cast<acc_t>(p[s.off[0]]));
  const acc_t b = finite_or_zero(static_cast<acc_t>(p[s.off[1]]));
  const acc_t d = finite_or_zero(static_cast<acc_t>(p[s.off[2]]));
  const acc_t lo = a < b ? a : b;
  const acc_t hi = a < b ? b : a;
  const acc_t m = hi < d ? hi : d;
  return lo < m ? m : lo;  // median of a, b, d
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    bn_stats_planes_kernel(const scalar_t* __restrict__ x, PlaneGeom g, ShiftSamples shift_at,
                           acc_t* __restrict__ partial) {
  const int64_t c = blockIdx.x;
  const acc_t shift = channel_shift<scalar_t, acc_t>(x, c, shift_at);
  Welford<acc_t> w{acc_t(0), acc_t(0), acc_t(0)};
  for_each_plane_row<V, false>(g, c, [&](auto u, auto width, int64_t off, int64_t step) {
    constexpr int U = decltype(u)::value;
    constexpr int W = decltype(width)::value;
    acc_t v[U][W];
#pragma unroll
    for (int j = 0; j < U; ++j) load_vec<W>(x + off + j * step, v[j]);
#pragma unroll
    for (int j = 0; j < U; ++j) {
#pragma unroll
      for (int i = 0; i < W; ++i) v[j][i] -= shift;
      welford_add<W>(w, v[j]);
    }
  });
  w = block_reduce_all(w);
  if (threadIdx.x == 0) {
    const int64_t plane = static_cast<int64_t>(gridDim.y) * g.C;
    Fields<Welford<acc_t>>::put(partial + blockIdx.y * g.C + c, plane, w);
  }
}

// The statistics of U loaded rows added to a thread's per-channel mean and M2 (count n, the
// same for its V channels): groups of G rows get their own mean and M2 per channel, then one Chan
// merge (one division per group). A group converts only its own values. A step of fewer rows
// than UNROLL (a thread's last rows) adds them one at a time.
template <int UNROLL, int U, int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void rows_welford(const Loaded<scalar_t, V> (&v)[U],
                                             const acc_t (&shift)[V], acc_t (&mean)[V],
                                             acc_t (&m2)[V], acc_t& n) {
  constexpr int G = U < UNROLL ? 1 : (U < kUnroll ? U : kUnroll);
  static_assert(U % G == 0, "rows per step must be whole groups");
#pragma unroll
  for (int j0 = 0; j0 < U; j0 += G) {
    const acc_t nn = n + acc_t(G);
    const acc_t inv = acc_t(1) / nn;
    const acc_t r = acc_t(G) * inv;
    const acc_t ra = n * inv;
    const acc_t nr = n * r;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      acc_t t[G];
      acc_t cm = acc_t(0);
#pragma unroll
      for (int j = 0; j < G; ++j) {
        t[j] = v[j0 + j].template get<acc_t>(i) - shift[i];
        cm += t[j];
      }
      cm *= acc_t(1) / acc_t(G);
      acc_t c2 = acc_t(0);
#pragma unroll
      for (int j = 0; j < G; ++j) {
        const acc_t d = t[j] - cm;
        c2 += d * d;
      }
      const acc_t delta = cm - mean[i];
      mean[i] = mean[i] * ra + cm * r;  // weighted, as in welford_merge
      m2[i] += c2 + delta * delta * nr;
    }
    n = nn;
  }
}

// Each thread keeps a mean, an M2 and a shift per channel of its vector in registers. 8 wide
// (16-bit inputs in 16-byte vectors) that state and the loads in flight go past the 64 registers
// of the 2-block bound and spill on every step, so the host launches 16-bit inputs 4 wide with 8
// rows per step (StatsRows): the same bytes in flight per thread, half the state.
template <typename scalar_t, typename acc_t, int V, int UNROLL = kUnroll>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    bn_stats_rows_kernel(const scalar_t* __restrict__ x, RowGeom g, ShiftSamples shift_at,
                         acc_t* __restrict__ partial) {
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  acc_t mean[V], m2[V], shift[V];
#pragma unroll
  for (int i = 0; i < V; ++i) mean[i] = m2[i] = shift[i] = acc_t(0);
  acc_t n = acc_t(0);
  if (cv < g.Cv) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      shift[i] = channel_shift<scalar_t, acc_t>(x, cv * V + i, shift_at);
    }
    for_each_row<V, false, UNROLL>(g, cv, [&](auto u, int64_t off, int64_t step) {
      constexpr int U = decltype(u)::value;
      Loaded<scalar_t, V> v[U];
#pragma unroll
      for (int j = 0; j < U; ++j) v[j].load(x + off + j * step);
      rows_welford<UNROLL>(v, shift, mean, m2, n);
    });
  }
  Welford<acc_t> w[V];
#pragma unroll
  for (int i = 0; i < V; ++i) w[i] = Welford<acc_t>{mean[i], m2[i], n};
  Welford<acc_t> r;
  int col, i;
  if (block_reduce_columns_vec<V>(w, r, col, i)) {
    const int64_t cvx = static_cast<int64_t>(blockIdx.x) * blockDim.x + col;
    if (cvx < g.Cv) {
      const int64_t plane = static_cast<int64_t>(gridDim.y) * g.C;
      Fields<Welford<acc_t>>::put(partial + blockIdx.y * g.C + cvx * V + i, plane, r);
    }
  }
}

// Training forward, step 2: merge a channel's partials in a fixed order (merge_partials); write
// save_mean, save_invstd and update the running statistics. With OUT_VAR (batch_norm_stats)
// save_invstd receives the biased variance itself and eps is unused.
template <typename scalar_t, typename acc_t, bool OUT_VAR = false>
__global__ void __launch_bounds__(kFinalizeThreads)
    bn_stats_finalize_kernel(const acc_t* __restrict__ partial, int64_t P, int64_t C,
                             const scalar_t* __restrict__ x, ShiftSamples shift_at,
                             acc_t inv_count, acc_t eps, acc_t* __restrict__ save_mean,
                             acc_t* __restrict__ save_invstd, RunningUpdate<acc_t> ru) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const Welford<acc_t> w = merge_partials<Welford<acc_t>>(partial, P, C, c);
  if (threadIdx.y != 0 || c >= C) return;
  const acc_t mean = channel_shift<scalar_t, acc_t>(x, c, shift_at) + w.mean;
  acc_t var = w.m2 * inv_count;  // biased variance; the exact count comes from the host
  var = var < acc_t(0) ? acc_t(0) : var;
  save_mean[c] = mean;
  save_invstd[c] = OUT_VAR ? var : rsqrt_acc(var + eps);
  update_running<scalar_t>(ru, c, mean, var);
}

// batch_norm_train_with_stats, step 1 (and batch_norm_dual in eval): the statistics are given
// (mean and biased variance, or the running statistics; either dtype, any stride). save_mean =
// mean, save_invstd = 1 / sqrt(var + eps) (in double, rounded once), and the running statistics
// updated as above when ru has them. One thread per channel.
template <typename scalar_t, typename acc_t>
__global__ void bn_given_stats_kernel(ChannelParam mean, ChannelParam var, int64_t C, double eps,
                                      acc_t* __restrict__ save_mean,
                                      acc_t* __restrict__ save_invstd, RunningUpdate<acc_t> ru) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const acc_t m = load_param<scalar_t>(mean, c, acc_t(0));
  const acc_t v = load_param<scalar_t>(var, c, acc_t(1));
  save_mean[c] = m;
  save_invstd[c] = static_cast<acc_t>(1.0 / sqrt(static_cast<double>(v) + eps));
  update_running<scalar_t>(ru, c, m, v);
}

// ---------------------------------------------------------------------------------------------
// Normalize (training forward step 3, and the whole of eval):
// y = [relu]((x - mean) * invstd * weight + bias [+ residual]). With DUAL (batch_norm_dual) `res`
// is the second input and the term added is its own batch norm with the parameters p2:
// y = [relu](bn(x) + bn2(res)), summed in the accumulation dtype and rounded once. The DUAL
// kernels keep two inputs' loads and five per-channel values per vector lane in registers: at
// two 512-thread blocks per multiprocessor (64 registers a thread) the 16-bit rows variants
// spilled about 400 bytes a thread, so they are bounded to one block (512 threads x 4
// vectors x 2 inputs in flight per multiprocessor is still enough to cover memory latency).
//
// With MASK (a training forward with ReLU whose backward is recorded) the kernels also write the
// ReLU mask of the output, in the layout of the backward's (see above): for each V-wide vector
// at element offset e, the byte at e / V with bit i = relu_passes(output at e + i). Scalar
// accesses (a planes row's head and tail) write nothing: the backward reads the output there.
template <bool DUAL>
constexpr int normalize_min_blocks() {
  return DUAL ? 1 : kMinBlocks;
}

// One step of a normalize kernel: U vectors of W elements of x (and, with RES, of res) at off +
// u * step, written to y at yoff + u * ystep; with MASK also the output vectors' ReLU mask bytes
// (at yoff / V: the output's offsets are the input's where the mask is written).
template <int U, int W, int V, bool RES, bool RELU, bool MASK, typename scalar_t, typename acc_t,
          int NC, typename Term>
__device__ __forceinline__ void normalize_step(const scalar_t* __restrict__ x,
                                               const scalar_t* __restrict__ res,
                                               scalar_t* __restrict__ y,
                                               uint8_t* __restrict__ mask, int64_t off,
                                               int64_t step, int64_t yoff, int64_t ystep,
                                               const acc_t (&mean)[NC], const acc_t (&scale)[NC],
                                               const acc_t (&shift)[NC], const Term (&term)[NC]) {
  scalar_t v[U][W];
  scalar_t r[U][W];
#pragma unroll
  for (int j = 0; j < U; ++j) {
    load_raw<W>(x + off + j * step, v[j]);
    if constexpr (RES) load_raw<W>(res + off + j * step, r[j]);
  }
#pragma unroll
  for (int j = 0; j < U; ++j) {
    scalar_t o[W];
    unsigned pass = 0;
    (void)pass;  // computed only with MASK
#pragma unroll
    for (int i = 0; i < W; ++i) {
      o[i] = normalize_one<RES, RELU, scalar_t>(static_cast<acc_t>(v[j][i]), lane(mean, i),
                                                lane(scale, i), lane(shift, i),
                                                RES ? lane(term, i)(r[j][i]) : acc_t(0));
      if constexpr (MASK) pass |= static_cast<unsigned>(relu_output_passes(o[i])) << i;
    }
    store_raw<W>(y + yoff + j * ystep, o);
    if constexpr (MASK) mask[(yoff + j * ystep) / V] = static_cast<uint8_t>(pass);
  }
}

template <typename scalar_t, typename acc_t, int V, bool RES, bool RELU, bool REVERSE,
          bool DUAL = false, bool MASK = false>
__global__ void __launch_bounds__(kThreads, normalize_min_blocks<DUAL>())
    bn_normalize_planes_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                               scalar_t* __restrict__ y, AffineParams<acc_t> p, PlaneGeom g,
                               AffineParams<acc_t> p2, uint8_t* __restrict__ mask) {
  static_assert(!MASK || (RELU && V > 1 && V <= 8), "the ReLU mask is written for vectors");
  const int64_t c = blockIdx.x;
  acc_t mean[1], scale[1], shift[1];
  ResidualTerm<acc_t, DUAL> term[1];
  channel_affine<scalar_t>(p, c, mean[0], scale[0], shift[0]);
  if constexpr (DUAL) second_affine<scalar_t>(p2, c, term[0], shift[0]);
  for_each_plane_row<V, REVERSE>(g, c, [&](auto u, auto width, int64_t off, int64_t step) {
    constexpr int W = decltype(width)::value;
    normalize_step<decltype(u)::value, W, V, RES || DUAL, RELU, MASK && W == V>(
        x, res, y, mask, off, step, off, step, mean, scale, shift, term);
  });
}

template <typename scalar_t, typename acc_t, int V, bool RES, bool RELU, bool REVERSE,
          bool DUAL = false, bool MASK = false>
__global__ void __launch_bounds__(kThreads, normalize_min_blocks<DUAL>())
    bn_normalize_rows_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                             scalar_t* __restrict__ y, AffineParams<acc_t> p, RowGeom g,
                             AffineParams<acc_t> p2, uint8_t* __restrict__ mask) {
  static_assert(!MASK || (RELU && V > 1 && V <= 8), "the ReLU mask is written for vectors");
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cv >= g.Cv) return;
  acc_t mean[V], scale[V], shift[V];
  ResidualTerm<acc_t, DUAL> term[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    channel_affine<scalar_t>(p, cv * V + i, mean[i], scale[i], shift[i]);
    if constexpr (DUAL) second_affine<scalar_t>(p2, cv * V + i, term[i], shift[i]);
  }
  // 16-bit residual + ReLU (BN+add+ReLU), 8 channels a thread: two rows per step, the same 64
  // bytes in flight per thread as four rows of one input. Four spilled inside the loop at the
  // 2-block bound (40 bytes a thread for bfloat16, 28 for float16); two do not. Without the ReLU,
  // two rows per step spill more than four do (nvcc 13.0, sm_90), so those keep four.
  constexpr int kRows =
      ((RES && RELU && !DUAL) || MASK) && sizeof(scalar_t) == 2 && V == 8 ? kUnroll / 2 : kUnroll;
  for_each_row<V, REVERSE, kRows>(g, cv, [&](auto u, int64_t off, int64_t step) {
    normalize_step<decltype(u)::value, V, V, RES || DUAL, RELU, MASK>(
        x, res, y, mask, off, step, off, step, mean, scale, shift, term);
  });
}

// ---------------------------------------------------------------------------------------------
// Training forward on chip: statistics, finalize and normalize in one cooperative kernel (rows
// layout, V-wide vectors, no residual; the host launches it where batch_norm_forward.cu says).
// 1. Each thread reads its rows of the block's range (row first + ty_i + k * ty), the first
//    `cached` rows of the range into shared memory as it goes, and keeps Welford statistics of
//    its V channels; the block reduces them to one partial per channel ([3][gridDim.x][C]).
// 2. grid_sync; then every block merges all partials of every channel in the same fixed order
//    (merge_partials_in, so every block gets bitwise the same statistics) into shared memory;
//    block 0 writes save_mean/save_invstd and updates the running statistics.
// 3. Normalize: the rows that were not cached last-first (what this block read last is still in
//    L2), then the cached rows from shared memory. Each thread reads back only what it wrote
//    itself, so the cache needs no barrier.
// Bytes: x read once, plus the rows not cached read again (partly from L2), y written once: 2Nb
// when every row fits in shared memory, at most 3Nb otherwise.
// The part of an on-chip kernel's rows a thread sees: block b's rows [first, first + nrows),
// of which the first ncached are kept in shared memory; the thread (cv, ry) walks rows
// ry, ry + ty, ... of them, vector cv of each (none when inactive: cv past the channels).
struct OnchipRows {
  int64_t first;
  int64_t nrows;
  int64_t ncached;
  int64_t col;   // cv * V
  int64_t step;  // ty * C: from a thread's row to its next, in the tensors and the cache
  int ty;
  int ry;
  bool active;
  __device__ OnchipRows(const OnchipGeom& g, int V) {
    first = static_cast<int64_t>(blockIdx.x) * g.per_block;
    const int64_t left = g.R - first;
    nrows = left < 0 ? 0 : (left < g.per_block ? left : g.per_block);
    ncached = g.cached < nrows ? g.cached : nrows;
    ty = blockDim.y;
    ry = threadIdx.y;
    col = static_cast<int64_t>(threadIdx.x) * V;
    step = ty * g.C;
    active = static_cast<int64_t>(threadIdx.x) < g.Cv;
  }
  // f(std::integral_constant<int, U>, l) for the thread's rows l < ncached, U at a time (then one
  // at a time), in order.
  template <int U, typename F>
  __device__ __forceinline__ void cached(F&& f) const {
    int64_t l = ry;
    for (; l + (U - 1) * ty < ncached; l += U * ty) f(std::integral_constant<int, U>(), l);
    for (; l < ncached; l += ty) f(std::integral_constant<int, 1>(), l);
  }
  // The same for its rows from ncached on, in order, or (REVERSE) the last first.
  template <int U, bool REVERSE, typename F>
  __device__ __forceinline__ void streamed(F&& f) const {
    const int64_t lo = ncached + ry;
    if (!REVERSE) {
      int64_t l = lo;
      for (; l + (U - 1) * ty < nrows; l += U * ty) f(std::integral_constant<int, U>(), l);
      for (; l < nrows; l += ty) f(std::integral_constant<int, 1>(), l);
    } else {
      int64_t remaining = nrows > lo ? (nrows - 1 - lo) / ty + 1 : 0;
      for (; remaining >= U; remaining -= U) {
        f(std::integral_constant<int, U>(), lo + (remaining - U) * ty);
      }
      for (; remaining > 0; --remaining) {
        f(std::integral_constant<int, 1>(), lo + (remaining - 1) * ty);
      }
    }
  }
};

// The on-chip kernels' exchange between blocks: each thread's values v[i] of its V channels
// reduced over the block into one partial per channel ([count][gridDim.x][C] at `partial`),
// grid_sync, then every block merges every channel's partials in the same order
// (merge_partials_in, `lanes` lanes, X = kThreads / lanes channels at a time) and calls
// done(c, merged) in one thread per channel. The partials are read back with ordinary loads
// (merge_partials_in reads nothing else of them through the read-only path: checked in the
// SASS), after the barrier's acquire. Call from every thread of the block.
template <int V, typename R, typename T, typename F>
__device__ __forceinline__ void onchip_exchange(const R (&v)[V], const OnchipGeom& g, T* partial,
                                                T* scratch, F&& done) {
  const int tx = blockDim.x;
  const int64_t C = g.C;
  R r;
  int c, i;
  if (block_reduce_columns_vec_in<V>(v, r, c, i, scratch, tx) && c < g.Cv) {
    Fields<R>::put(partial + static_cast<int64_t>(blockIdx.x) * C + c * V + i,
                   static_cast<int64_t>(gridDim.x) * C, r);
  }
  grid_sync();
  const int Y = g.lanes;
  const int X = kThreads / Y;
  const int t = threadIdx.y * tx + threadIdx.x;
  const int lx = t % X;
  const int ly = t / X;
  for (int64_t c0 = 0; c0 < C; c0 += X) {
    const int64_t ch = c0 + lx;
    const R merged = merge_partials_in<R>(partial, gridDim.x, C, ch, lx, ly, X, Y, scratch);
    if (ly == 0 && ch < C) done(ch, merged);
  }
  __syncthreads();
}

template <typename acc_t>
struct OnchipArgs {
  acc_t* partial;  // [3][gridDim.x][C]
  ShiftSamples shift_at;
  acc_t inv_count;
  acc_t eps;
  acc_t* save_mean;
  acc_t* save_invstd;
  RunningUpdate<acc_t> running;
};

template <typename scalar_t, typename acc_t, int V, bool RELU, bool MASK>
__global__ void __launch_bounds__(kThreads, 1)
    bn_train_onchip_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                AffineParams<acc_t> p, OnchipGeom g, OnchipArgs<acc_t> a,
                                uint8_t* __restrict__ mask) {
  static_assert(V > 1 && (!MASK || (RELU && V <= 8)), "vectors only; the mask is for ReLU");
  static_assert(kThreads == kFinalizeThreads, "the finalize step runs on the block's threads");
  const OnchipRows rows(g, V);
  const int64_t C = g.C;
  const int64_t col = rows.col;
  const int64_t step = rows.step;
  const int64_t base = rows.first * C + col;  // the thread's first element in x and y
  scalar_t* cache = dynamic_shared<scalar_t>();
  acc_t* stats = reinterpret_cast<acc_t*>(cache + g.cached * C);  // mean [C], invstd [C]
  acc_t* scratch = stats + 2 * C;
  const scalar_t* const kNoResidual = nullptr;
  constexpr int U = kUnroll;

  // 1. Statistics of x - shift (see channel_shift), caching the first rows.
  acc_t mean[V], m2[V], shift[V];
#pragma unroll
  for (int i = 0; i < V; ++i) mean[i] = m2[i] = shift[i] = acc_t(0);
  acc_t n = acc_t(0);
  if (rows.active) {
#pragma unroll
    for (int i = 0; i < V; ++i) shift[i] = channel_shift<scalar_t, acc_t>(x, col + i, a.shift_at);
    rows.cached<U>([&](auto u, int64_t l) {
      constexpr int UU = decltype(u)::value;
      Loaded<scalar_t, V> v[UU];
#pragma unroll
      for (int j = 0; j < UU; ++j) v[j].load(x + base + l * C + j * step);
#pragma unroll
      for (int j = 0; j < UU; ++j) v[j].store(cache + l * C + col + j * step);
      rows_welford<U>(v, shift, mean, m2, n);
    });
    rows.streamed<U, false>([&](auto u, int64_t l) {
      constexpr int UU = decltype(u)::value;
      Loaded<scalar_t, V> v[UU];
#pragma unroll
      for (int j = 0; j < UU; ++j) v[j].load(x + base + l * C + j * step);
      rows_welford<U>(v, shift, mean, m2, n);
    });
  }

  // 2. The statistics of every channel, in every block; block 0 writes save_mean/save_invstd
  // and updates the running statistics.
  Welford<acc_t> w[V];
#pragma unroll
  for (int i = 0; i < V; ++i) w[i] = Welford<acc_t>{mean[i], m2[i], n};
  onchip_exchange<V>(w, g, a.partial, scratch, [&](int64_t c, const Welford<acc_t>& s) {
    const acc_t m = channel_shift<scalar_t, acc_t>(x, c, a.shift_at) + s.mean;
    acc_t var = s.m2 * a.inv_count;  // biased variance
    var = var < acc_t(0) ? acc_t(0) : var;
    const acc_t invstd = rsqrt_acc(var + a.eps);
    stats[c] = m;
    stats[C + c] = invstd;
    if (blockIdx.x == 0) {
      a.save_mean[c] = m;
      a.save_invstd[c] = invstd;
      update_running<scalar_t>(a.running, c, m, var);
    }
  });
  if (!rows.active) return;  // no barrier below

  // 3. Normalize: the rows not cached last-first, then the cached ones.
  p.mean = ChannelParam{stats, 1, true};
  p.invstd = ChannelParam{stats + C, 1, true};
  acc_t cmean[V], scale[V], cshift[V];
  ResidualTerm<acc_t, false> term[V];
#pragma unroll
  for (int i = 0; i < V; ++i) channel_affine<scalar_t>(p, col + i, cmean[i], scale[i], cshift[i]);
  rows.streamed<U, true>([&](auto u, int64_t l) {
    const int64_t off = base + l * C;
    normalize_step<decltype(u)::value, V, V, false, RELU, MASK>(
        x, kNoResidual, y, mask, off, step, off, step, cmean, scale, cshift, term);
  });
  rows.cached<U>([&](auto u, int64_t l) {
    normalize_step<decltype(u)::value, V, V, false, RELU, MASK>(
        cache, kNoResidual, y, mask, l * C + col, step, base + l * C, step, cmean, scale, cshift,
        term);
  });
}

// The ReLU mask of an output that the normalize kernels wrote V = 1 wide (an input or residual
// not 16-byte aligned; the output always is): the bytes MASK writes at V, from the output.
template <int U, int V, typename scalar_t>
__device__ __forceinline__ void relu_mask_of(const scalar_t* __restrict__ y, int64_t off,
                                             int64_t step, uint8_t* __restrict__ mask) {
  scalar_t o[U][V];
#pragma unroll
  for (int j = 0; j < U; ++j) load_raw<V>(y + off + j * step, o[j]);
#pragma unroll
  for (int j = 0; j < U; ++j) {
    unsigned pass = 0;
#pragma unroll
    for (int i = 0; i < V; ++i) pass |= static_cast<unsigned>(relu_output_passes(o[j][i])) << i;
    mask[(off + j * step) / V] = static_cast<uint8_t>(pass);
  }
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    bn_relu_mask_planes_kernel(const scalar_t* __restrict__ y, PlaneGeom g,
                               uint8_t* __restrict__ mask) {
  for_each_plane_row<V, false>(g, blockIdx.x, [&](auto u, auto width, int64_t off, int64_t step) {
    if constexpr (decltype(width)::value == V) {
      relu_mask_of<decltype(u)::value, V>(y, off, step, mask);
    }
  });
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    bn_relu_mask_rows_kernel(const scalar_t* __restrict__ y, RowGeom g,
                             uint8_t* __restrict__ mask) {
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cv >= g.Cv) return;
  for_each_row<V, false>(g, cv, [&](auto u, int64_t off, int64_t step) {
    relu_mask_of<decltype(u)::value, V>(y, off, step, mask);
  });
}

// ---------------------------------------------------------------------------------------------
// batch_norm_cat_with_stats: the normalize of the concatenation of up to kMaxCatInputs feature
// maps along the channels, each read where it is and written into its channels of the output, in
// one launch. The per-channel parameters are those of the concatenation (output channel c).

constexpr int kMaxCatInputs = 64;

struct CatInputs {
  int n;                                // inputs
  const void* ptr[kMaxCatInputs];       // each contiguous in the output's memory format
  int64_t c0[kMaxCatInputs + 1];        // first output channel of each input; c0[n] = C
};

// The input that holds output channel c (c0 is increasing).
__device__ __forceinline__ int cat_input_of(const CatInputs& in, int64_t c) {
  int i = 0;
  while (i + 1 < in.n && in.c0[i + 1] <= c) ++i;
  return i;
}

// planes: block (c, y) normalizes output channel c, read from its input's plane.
template <typename scalar_t, typename acc_t, int V, bool RELU>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    bn_cat_normalize_planes_kernel(CatInputs in, scalar_t* __restrict__ y, AffineParams<acc_t> p,
                                   PlaneGeom g) {
  const int64_t c = blockIdx.x;
  const int k = cat_input_of(in, c);
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(in.ptr[k]);
  PlaneGeom gi = g;  // the input's geometry: its own channel count
  gi.C = in.c0[k + 1] - in.c0[k];
  acc_t mean[1], scale[1], shift[1];
  const ResidualTerm<acc_t, false> none[1];
  channel_affine<scalar_t>(p, c, mean[0], scale[0], shift[0]);
  for_each_plane_row_to<V, false>(
      gi, c - in.c0[k], g.C, c,
      [&](auto u, auto width, int64_t off, int64_t step, int64_t yd) {
        normalize_step<decltype(u)::value, decltype(width)::value, V, false, RELU, false>(
            x, static_cast<const scalar_t*>(nullptr), y, nullptr, off, step, off + yd, step, mean,
            scale, shift, none);
      });
}

// rows: thread cv normalizes output channels [cv * V, cv * V + V), all in one input (the host
// takes V > 1 only when every input's channel count is a multiple of V).
template <typename scalar_t, typename acc_t, int V, bool RELU>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    bn_cat_normalize_rows_kernel(CatInputs in, scalar_t* __restrict__ y, AffineParams<acc_t> p,
                                 RowGeom g) {
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cv >= g.Cv) return;
  const int64_t c = cv * V;
  const int k = cat_input_of(in, c);
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(in.ptr[k]);
  const int64_t ck = in.c0[k + 1] - in.c0[k];
  const RowGeom gi{g.R, ck, ck / V};
  acc_t mean[V], scale[V], shift[V];
  const ResidualTerm<acc_t, false> none[V];
#pragma unroll
  for (int i = 0; i < V; ++i) channel_affine<scalar_t>(p, c + i, mean[i], scale[i], shift[i]);
  for_each_row_to<V, false>(
      gi, (c - in.c0[k]) / V, g.C, c,
      [&](auto u, int64_t off, int64_t step, int64_t yoff, int64_t ystep) {
        normalize_step<decltype(u)::value, V, V, false, RELU, false>(
            x, static_cast<const scalar_t*>(nullptr), y, nullptr, off, step, yoff, ystep, mean,
            scale, shift, none);
      });
}

// ---------------------------------------------------------------------------------------------
// Backward, step 1: per-block sums of g and g * (x - mean), g = grad_output [zeroed where
// output <= 0]. partial = [2][gridDim.y][C]. Also writes, in the same pass, the masked gradient
// into grad_residual (WRITE_GR) and, in eval where dx does not depend on the sums, dx = g * weight
// * invstd (EVAL_DX).
//
// With DUAL (batch_norm_dual_backward, out = [relu](bn(x) + bn2(z))) the same g is the output
// gradient of both batch norms: the pass also reads z and sums g * (z - mean2) (partial =
// [3][gridDim.y][C]), and in eval writes dz = g * weight2 * invstd2 too.

// The second input of the dual backward, with its statistics, weight and outputs.
template <typename scalar_t, typename acc_t>
struct SecondInput {
  const scalar_t* z = nullptr;
  const acc_t* mean = nullptr;    // [C], contiguous
  const acc_t* invstd = nullptr;  // [C], contiguous
  ChannelParam weight;
  scalar_t* dz = nullptr;         // grad_input2
  acc_t* grad_weight = nullptr;
  acc_t* grad_bias = nullptr;
  acc_t* coef = nullptr;          // its dx coefficients, [3][C] (training)
};

// The loads of one backward step, all issued before any arithmetic: U vectors of W elements of
// the gradient and x at off + u * step, with OUT of the output (where the ReLU mask is read from
// its values), with BITS the ReLU mask's byte of each vector, with DUAL of z.
template <int U, int W, int V, bool OUT, bool BITS, bool DUAL, typename scalar_t>
__device__ __forceinline__ void load_backward_step(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ out, const scalar_t* __restrict__ z,
    const uint8_t* __restrict__ bits, int64_t off, int64_t step, scalar_t (&gv)[U][W],
    scalar_t (&xv)[U][W], scalar_t (&ov)[U][W], scalar_t (&zv)[U][W], unsigned (&pass)[U]) {
#pragma unroll
  for (int j = 0; j < U; ++j) {
    load_raw<W>(grad + off + j * step, gv[j]);
    load_raw<W>(x + off + j * step, xv[j]);
    if constexpr (OUT) load_raw<W>(out + off + j * step, ov[j]);
    if constexpr (BITS) pass[j] = bits[(off + j * step) / V];
    if constexpr (DUAL) load_raw<W>(z + off + j * step, zv[j]);
  }
}

// A channel's values for the reduce pass: its mean and, in eval (EVAL_DX), the factor of dx =
// g * weight * invstd; with DUAL the second input's too.
template <bool EVAL_DX, bool DUAL, typename scalar_t, typename acc_t, int NC>
__device__ __forceinline__ void load_reduce_channels(const acc_t* __restrict__ mean,
                                                     const acc_t* __restrict__ invstd,
                                                     const ChannelParam& weight,
                                                     const SecondInput<scalar_t, acc_t>& second,
                                                     int64_t c0, acc_t (&m)[NC], acc_t (&k)[NC],
                                                     acc_t (&m2)[NC], acc_t (&k2)[NC]) {
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    const int64_t c = c0 + i;
    m[i] = mean[c];
    k[i] = m2[i] = k2[i] = acc_t(0);
    if constexpr (EVAL_DX) k[i] = invstd[c] * load_param<scalar_t>(weight, c, acc_t(1));
    if constexpr (DUAL) {
      m2[i] = second.mean[c];
      if constexpr (EVAL_DX) {
        k2[i] = second.invstd[c] * load_param<scalar_t>(second.weight, c, acc_t(1));
      }
    }
  }
}

// One step of the reduce pass: U vectors of W elements at off + u * step, added to the sums sa
// (g), sb (g * (x - mean)) and with DUAL sc (g * (z - mean2)). A vector's ReLU mask byte is
// read (kBitsRead) or written (kBitsWrite) when W == V; scalars read the output.
template <int U, int W, int V, bool RELU, bool WRITE_GR, bool EVAL_DX, bool DUAL, int BITS,
          typename scalar_t, typename acc_t, int NC>
__device__ __forceinline__ void reduce_step(
    const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ out, const scalar_t* __restrict__ z, uint8_t* __restrict__ bits,
    scalar_t* __restrict__ gr, scalar_t* __restrict__ dx, scalar_t* __restrict__ dz, int64_t off,
    int64_t step, const acc_t (&m)[NC], const acc_t (&k)[NC], const acc_t (&m2)[NC],
    const acc_t (&k2)[NC], acc_t (&sa)[NC], acc_t (&sb)[NC], acc_t (&sc)[NC]) {
  constexpr bool kRead = BITS == kBitsRead && W == V;  // vectors: the forward's mask
  constexpr bool kWrite = BITS == kBitsWrite && W == V;
  constexpr bool kOut = RELU && !kRead;
  scalar_t gv[U][W], ov[U][W];
  scalar_t xv[U][W], zv[U][W];
  unsigned rp[U];
  load_backward_step<U, W, V, kOut, kRead, DUAL>(go, x, out, z, bits, off, step, gv, xv, ov, zv,
                                                 rp);
#pragma unroll
  for (int j = 0; j < U; ++j) {
    scalar_t gm[W], d[W], d2[W];
    (void)d;   // written only with EVAL_DX
    (void)d2;  // written only with EVAL_DX and DUAL
    unsigned pass = 0;
    (void)pass;  // computed only with kWrite
#pragma unroll
    for (int i = 0; i < W; ++i) {
      if constexpr (kRead) {
        gm[i] = (rp[j] >> i) & 1u ? gv[j][i] : static_cast<scalar_t>(0.0f);
      } else {
        gm[i] = masked_grad<kOut>(gv[j][i], kOut ? ov[j][i] : gv[j][i]);
      }
      if constexpr (kWrite) pass |= static_cast<unsigned>(relu_passes(ov[j][i])) << i;
      const acc_t ga = static_cast<acc_t>(gm[i]);
      lane(sa, i) += ga;
      lane(sb, i) += ga * (static_cast<acc_t>(xv[j][i]) - lane(m, i));
      if constexpr (DUAL) lane(sc, i) += ga * (static_cast<acc_t>(zv[j][i]) - lane(m2, i));
      if constexpr (EVAL_DX) d[i] = static_cast<scalar_t>(ga * lane(k, i));
      if constexpr (EVAL_DX && DUAL) d2[i] = static_cast<scalar_t>(ga * lane(k2, i));
    }
    if constexpr (kWrite) bits[(off + j * step) / V] = static_cast<uint8_t>(pass);
    if constexpr (WRITE_GR) store_raw<W>(gr + off + j * step, gm);
    if constexpr (EVAL_DX) store_raw<W>(dx + off + j * step, d);
    if constexpr (EVAL_DX && DUAL) store_raw<W>(dz + off + j * step, d2);
  }
}

template <typename scalar_t, typename acc_t, int V, bool RELU, bool WRITE_GR, bool EVAL_DX,
          bool DUAL = false, int BITS = kBitsNone>
__global__ void __launch_bounds__(kThreads) bn_backward_reduce_planes_kernel(
    const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ out, const acc_t* __restrict__ mean,
    const acc_t* __restrict__ invstd, ChannelParam weight, scalar_t* __restrict__ gr,
    scalar_t* __restrict__ dx, PlaneGeom g, acc_t* __restrict__ partial,
    SecondInput<scalar_t, acc_t> second, uint8_t* __restrict__ bits) {
  static_assert(BITS == kBitsNone || (RELU && V > 1 && V <= 8), "the ReLU mask is of vectors");
  const int64_t c = blockIdx.x;
  acc_t m[1], k[1], m2[1], k2[1];
  load_reduce_channels<EVAL_DX, DUAL>(mean, invstd, weight, second, c, m, k, m2, k2);
  acc_t sa[1] = {acc_t(0)}, sb[1] = {acc_t(0)}, sc[1] = {acc_t(0)};
  // Writing the ReLU mask, 16-bit 8-wide: two rows per step (four spilled 28 bytes a thread
  // inside the loop for float16 with nvcc 13.0), 96 bytes in flight per thread.
  constexpr int kRows =
      BITS == kBitsWrite && sizeof(scalar_t) == 2 && V == 8 ? kUnroll / 2 : kUnroll;
  for_each_plane_row<V, false, kRows>(g, c, [&](auto u, auto width, int64_t off, int64_t step) {
    reduce_step<decltype(u)::value, decltype(width)::value, V, RELU, WRITE_GR, EVAL_DX, DUAL,
                BITS>(go, x, out, second.z, bits, gr, dx, second.dz, off, step, m, k, m2, k2, sa,
                      sb, sc);
  });
  const int64_t plane = static_cast<int64_t>(gridDim.y) * g.C;
  if constexpr (DUAL) {
    const Sum3<acc_t> s = block_reduce_all(Sum3<acc_t>{sa[0], sb[0], sc[0]});
    if (threadIdx.x == 0) Fields<Sum3<acc_t>>::put(partial + blockIdx.y * g.C + c, plane, s);
  } else {
    const Sum2<acc_t> s = block_reduce_all(Sum2<acc_t>{sa[0], sb[0]});
    if (threadIdx.x == 0) Fields<Sum2<acc_t>>::put(partial + blockIdx.y * g.C + c, plane, s);
  }
}

template <typename scalar_t, typename acc_t, int V, bool RELU, bool WRITE_GR, bool EVAL_DX,
          bool DUAL = false, int BITS = kBitsNone>
__global__ void __launch_bounds__(kThreads) bn_backward_reduce_rows_kernel(
    const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ out, const acc_t* __restrict__ mean,
    const acc_t* __restrict__ invstd, ChannelParam weight, scalar_t* __restrict__ gr,
    scalar_t* __restrict__ dx, RowGeom g, acc_t* __restrict__ partial,
    SecondInput<scalar_t, acc_t> second, uint8_t* __restrict__ bits) {
  static_assert(BITS == kBitsNone || (RELU && V > 1 && V <= 8), "the ReLU mask is of vectors");
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  acc_t sa[V], sb[V], sc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) sa[i] = sb[i] = sc[i] = acc_t(0);
  if (cv < g.Cv) {
    acc_t m[V], k[V], m2[V], k2[V];
    load_reduce_channels<EVAL_DX, DUAL>(mean, invstd, weight, second, cv * V, m, k, m2, k2);
    for_each_row<V, false>(g, cv, [&](auto u, int64_t off, int64_t step) {
      reduce_step<decltype(u)::value, V, V, RELU, WRITE_GR, EVAL_DX, DUAL, BITS>(
          go, x, out, second.z, bits, gr, dx, second.dz, off, step, m, k, m2, k2, sa, sb, sc);
    });
  }
  const int64_t plane = static_cast<int64_t>(gridDim.y) * g.C;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if constexpr (DUAL) {
      const Sum3<acc_t> s = block_reduce_columns(Sum3<acc_t>{sa[i], sb[i], sc[i]});
      if (threadIdx.y == 0 && cv < g.Cv) {
        Fields<Sum3<acc_t>>::put(partial + blockIdx.y * g.C + cv * V + i, plane, s);
      }
    } else {
      const Sum2<acc_t> s = block_reduce_columns(Sum2<acc_t>{sa[i], sb[i]});
      if (threadIdx.y == 0 && cv < g.Cv) {
        Fields<Sum2<acc_t>>::put(partial + blockIdx.y * g.C + cv * V + i, plane, s);
      }
    }
  }
}

// Backward, step 2: sum a channel's partials in a fixed order (merge_partials) into grad_bias =
// sum(g) and grad_weight = sum(g * xhat); in training also the coefficients of
//   dx = a * g - b - d * (x - mean),  a = weight * invstd, b = a * sum(g) / n,
//                                     d = a * invstd^2 * sum(g * (x - mean)) / n,
// stored as coef = [3][C]. With DUAL the same for the second input from the third sum (its
// grad_bias is the same sum(g)), into second's outputs.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void backward_finalize_one(acc_t sum_g, acc_t sum_gx, acc_t is,
                                                      acc_t w, acc_t inv_count, bool training,
                                                      int64_t c, int64_t C, acc_t* grad_weight,
                                                      acc_t* grad_bias, acc_t* coef) {
  grad_bias[c] = sum_g;
  grad_weight[c] = sum_gx * is;
  if (training) {
    const acc_t a = is * w;
    coef[c] = a;
    coef[C + c] = a * sum_g * inv_count;
    coef[2 * C + c] = a * is * is * sum_gx * inv_count;
  }
}

template <typename scalar_t, typename acc_t, bool DUAL = false>
__global__ void __launch_bounds__(kFinalizeThreads) bn_backward_finalize_kernel(
    const acc_t* __restrict__ partial, int64_t P, int64_t C, const acc_t* __restrict__ invstd,
    ChannelParam weight, acc_t inv_count, bool training, acc_t* __restrict__ grad_weight,
    acc_t* __restrict__ grad_bias, acc_t* __restrict__ coef, SecondInput<scalar_t, acc_t> second) {
  using S = std::conditional_t<DUAL, Sum3<acc_t>, Sum2<acc_t>>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const S s = merge_partials<S>(partial, P, C, c);
  if (threadIdx.y != 0 || c >= C) return;
  backward_finalize_one<scalar_t>(s.a, s.b, invstd[c], load_param<scalar_t>(weight, c, acc_t(1)),
                                  inv_count, training, c, C, grad_weight, grad_bias, coef);
  if constexpr (DUAL) {
    backward_finalize_one<scalar_t>(s.a, s.c, second.invstd[c],
                                    load_param<scalar_t>(second.weight, c, acc_t(1)), inv_count,
                                    training, c, C, second.grad_weight, second.grad_bias,
                                    second.coef);
  }
}

// batch_norm_backward_elemt, step 1: the dx coefficients above from reductions done elsewhere
// (mean_dy = sum(g) / n, mean_dy_xhat = sum(g * xhat) / n, over every process for a
// synchronized batch norm): a = weight * invstd, b = a * mean_dy, d = a * invstd * mean_dy_xhat.
// The [C] inputs are contiguous; one thread per channel.
template <typename scalar_t, typename acc_t>
__global__ void bn_elemt_coef_kernel(const acc_t* __restrict__ invstd, ChannelParam weight,
                                     const acc_t* __restrict__ mean_dy,
                                     const acc_t* __restrict__ mean_dy_xhat, int64_t C,
                                     acc_t* __restrict__ coef) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const acc_t is = invstd[c];
  const acc_t a = is * load_param<scalar_t>(weight, c, acc_t(1));
  coef[c] = a;
  coef[C + c] = a * mean_dy[c];
  coef[2 * C + c] = a * is * mean_dy_xhat[c];
}

// Backward, step 3 (training): dx = a * g - b - d * (x - mean). g is read from `grad` (already
// masked when it is grad_residual) and zeroed here where output <= 0 when MASK. With DUAL also
// dz = a2 * g - b2 - d2 * (z - mean2) from the same g, with second's coefficients.

// A channel's dx coefficients: mean, then a, b, d of coef = [3][C].
template <typename acc_t, int NC>
struct DxCoef {
  acc_t m[NC], a[NC], b[NC], d[NC];
  __device__ __forceinline__ void load(int i, const acc_t* __restrict__ mean,
                                       const acc_t* __restrict__ coef, int64_t C, int64_t c) {
    m[i] = mean[c];
    a[i] = coef[c];
    b[i] = coef[C + c];
    d[i] = coef[2 * C + c];
  }
};

// The coefficients of channels c0 + i, i < NC, and with DUAL the second input's.
template <bool DUAL, typename scalar_t, typename acc_t, int NC>
__device__ __forceinline__ void load_dx_coef(const acc_t* __restrict__ mean,
                                             const acc_t* __restrict__ coef,
                                             const SecondInput<scalar_t, acc_t>& second, int64_t C,
                                             int64_t c0, DxCoef<acc_t, NC>& k1,
                                             DxCoef<acc_t, NC>& k2) {
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    k1.load(i, mean, coef, C, c0 + i);
    k2.m[i] = k2.a[i] = k2.b[i] = k2.d[i] = acc_t(0);
    if constexpr (DUAL) k2.load(i, second.mean, second.coef, C, c0 + i);
  }
}

// One step of the dx pass: U vectors of W elements at off + u * step. With BITS a vector's g is
// masked by the ReLU mask's byte; scalars and !BITS read the output (when MASK).
template <int U, int W, int V, bool MASK, bool DUAL, bool BITS, typename scalar_t, typename acc_t,
          int NC>
__device__ __forceinline__ void dx_step(const scalar_t* __restrict__ grad,
                                        const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ out,
                                        const scalar_t* __restrict__ z,
                                        const uint8_t* __restrict__ bits, scalar_t* __restrict__ dx,
                                        scalar_t* __restrict__ dz, int64_t off, int64_t step,
                                        const DxCoef<acc_t, NC>& k1, const DxCoef<acc_t, NC>& k2) {
  constexpr bool kBits = BITS && W == V;  // vectors: the mask's bits; scalars: the output
  constexpr bool kOut = MASK && !kBits;
  scalar_t gv[U][W], ov[U][W];
  scalar_t xv[U][W], zv[U][W];
  unsigned pass[U];
  load_backward_step<U, W, V, kOut, kBits, DUAL>(grad, x, out, z, bits, off, step, gv, xv, ov,
                                                 zv, pass);
#pragma unroll
  for (int j = 0; j < U; ++j) {
    scalar_t o[W], o2[W];
    (void)o2;  // written only with DUAL
#pragma unroll
    for (int i = 0; i < W; ++i) {
      scalar_t gm;
      if constexpr (kBits) {
        gm = (pass[j] >> i) & 1u ? gv[j][i] : static_cast<scalar_t>(0.0f);
      } else {
        gm = masked_grad<kOut>(gv[j][i], kOut ? ov[j][i] : gv[j][i]);
      }
      const acc_t ga = static_cast<acc_t>(gm);
      o[i] = static_cast<scalar_t>(lane(k1.a, i) * ga - lane(k1.b, i) -
                                   lane(k1.d, i) * (static_cast<acc_t>(xv[j][i]) - lane(k1.m, i)));
      if constexpr (DUAL) {
        o2[i] = static_cast<scalar_t>(
            lane(k2.a, i) * ga - lane(k2.b, i) -
            lane(k2.d, i) * (static_cast<acc_t>(zv[j][i]) - lane(k2.m, i)));
      }
    }
    store_raw<W>(dx + off + j * step, o);
    if constexpr (DUAL) store_raw<W>(dz + off + j * step, o2);
  }
}

template <typename scalar_t, typename acc_t, int V, bool MASK, bool REVERSE, bool DUAL = false,
          bool BITS = false>
__global__ void __launch_bounds__(kThreads) bn_backward_dx_planes_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ out, const acc_t* __restrict__ mean,
    const acc_t* __restrict__ coef, scalar_t* __restrict__ dx, PlaneGeom g,
    SecondInput<scalar_t, acc_t> second, const uint8_t* __restrict__ bits) {
  static_assert(!BITS || (MASK && V > 1 && V <= 8), "the ReLU mask is read for vectors");
  const int64_t c = blockIdx.x;
  DxCoef<acc_t, 1> k1, k2;
  load_dx_coef<DUAL>(mean, coef, second, g.C, c, k1, k2);
  for_each_plane_row<V, REVERSE>(g, c, [&](auto u, auto width, int64_t off, int64_t step) {
    dx_step<decltype(u)::value, decltype(width)::value, V, MASK, DUAL, BITS>(
        grad, x, out, second.z, bits, dx, second.dz, off, step, k1, k2);
  });
}

template <typename scalar_t, typename acc_t, int V, bool MASK, bool REVERSE, bool DUAL = false,
          bool BITS = false>
__global__ void __launch_bounds__(kThreads) bn_backward_dx_rows_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ out, const acc_t* __restrict__ mean,
    const acc_t* __restrict__ coef, scalar_t* __restrict__ dx, RowGeom g,
    SecondInput<scalar_t, acc_t> second, const uint8_t* __restrict__ bits) {
  static_assert(!BITS || (MASK && V > 1 && V <= 8), "the ReLU mask is read for vectors");
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cv >= g.Cv) return;
  DxCoef<acc_t, V> k1, k2;
  load_dx_coef<DUAL>(mean, coef, second, g.C, cv * V, k1, k2);
  for_each_row<V, REVERSE>(g, cv, [&](auto u, int64_t off, int64_t step) {
    dx_step<decltype(u)::value, V, V, MASK, DUAL, BITS>(grad, x, out, second.z, bits, dx,
                                                        second.dz, off, step, k1, k2);
  });
}


// ---------------------------------------------------------------------------------------------
// Training backward on chip (rows layout, V-wide vectors, one input; the host launches it where
// batch_norm_backward.cuh says): reduce, finalize and dx in one cooperative kernel, as the
// on-chip forward above. The first `cached` rows of block b's range keep the masked gradient and
// x in shared memory ([cached][C] each, then coef [3][C] and the scratch). With RELU g is masked
// by the forward's ReLU mask (`bits`); with WRITE_GR the masked gradient is also written to
// grad_residual. The dx of the rows not cached reads g, x (and the mask) again, last-read-first.
// Bytes: g and x read once, dx written once, plus the rows not cached read again: 3Nb when every
// row fits (the three-kernel backward: 5Nb).
template <typename acc_t>
struct OnchipBackwardArgs {
  const acc_t* mean;
  const acc_t* invstd;
  ChannelParam weight;
  acc_t* partial;  // [2][gridDim.x][C]
  acc_t inv_count;
  acc_t* grad_weight;
  acc_t* grad_bias;
};

template <typename scalar_t, typename acc_t, int V, bool RELU, bool WRITE_GR>
__global__ void __launch_bounds__(kThreads, 1)
    bn_backward_onchip_rows_kernel(const scalar_t* __restrict__ go,
                                   const scalar_t* __restrict__ x,
                                   const uint8_t* __restrict__ bits, scalar_t* __restrict__ gr,
                                   scalar_t* __restrict__ dx, OnchipGeom g,
                                   OnchipBackwardArgs<acc_t> a) {
  static_assert(V > 1 && V <= 8, "vectors only (the ReLU mask has a bit per element of one)");
  static_assert(kThreads == kFinalizeThreads, "the finalize step runs on the block's threads");
  const OnchipRows rows(g, V);
  const int64_t C = g.C;
  const int64_t col = rows.col;
  const int64_t step = rows.step;
  const int64_t base = rows.first * C + col;  // the thread's first element in g, x and dx
  scalar_t* cache_g = dynamic_shared<scalar_t>();
  scalar_t* cache_x = cache_g + g.cached * C;
  acc_t* coef = reinterpret_cast<acc_t*>(cache_x + g.cached * C);  // a, b, d [3][C]
  acc_t* scratch = coef + 3 * C;
  scalar_t* const kNone = nullptr;
  constexpr int U = kUnroll;

  // 1. sum g and sum g * (x - mean) of the masked gradient, caching the first rows.
  acc_t sa[V], sb[V], m[V];
#pragma unroll
  for (int i = 0; i < V; ++i) sa[i] = sb[i] = m[i] = acc_t(0);
  auto reduce = [&](auto u, auto cache_it, int64_t l) {
    constexpr int UU = decltype(u)::value;
    const int64_t off = base + l * C;
    scalar_t gv[UU][V], xv[UU][V], ov[UU][V], zv[UU][V];
    unsigned pass[UU];
    load_backward_step<UU, V, V, false, RELU, false>(go, x, kNone, kNone, bits, off, step, gv, xv,
                                                     ov, zv, pass);
#pragma unroll
    for (int j = 0; j < UU; ++j) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        if constexpr (RELU) {
          gv[j][i] = (pass[j] >> i) & 1u ? gv[j][i] : static_cast<scalar_t>(0.0f);
        }
        const acc_t ga = static_cast<acc_t>(gv[j][i]);
        sa[i] += ga;
        sb[i] += ga * (static_cast<acc_t>(xv[j][i]) - m[i]);
      }
      if constexpr (WRITE_GR) store_raw<V>(gr + off + j * step, gv[j]);
      if constexpr (decltype(cache_it)::value) {
        store_raw<V>(cache_g + l * C + col + j * step, gv[j]);
        store_raw<V>(cache_x + l * C + col + j * step, xv[j]);
      }
    }
  };
  if (rows.active) {
#pragma unroll
    for (int i = 0; i < V; ++i) m[i] = a.mean[col + i];
    rows.cached<U>([&](auto u, int64_t l) { reduce(u, std::true_type(), l); });
    rows.streamed<U, false>([&](auto u, int64_t l) { reduce(u, std::false_type(), l); });
  }

  // 2. The dx coefficients of every channel (see bn_backward_finalize_kernel), in every block;
  // block 0 writes grad_weight and grad_bias.
  Sum2<acc_t> w[V];
#pragma unroll
  for (int i = 0; i < V; ++i) w[i] = Sum2<acc_t>{sa[i], sb[i]};
  onchip_exchange<V>(w, g, a.partial, scratch, [&](int64_t c, const Sum2<acc_t>& s) {
    const acc_t is = a.invstd[c];
    const acc_t ac = is * load_param<scalar_t>(a.weight, c, acc_t(1));
    coef[c] = ac;
    coef[C + c] = ac * s.a * a.inv_count;
    coef[2 * C + c] = ac * is * is * s.b * a.inv_count;
    if (blockIdx.x == 0) {
      a.grad_bias[c] = s.a;
      a.grad_weight[c] = s.b * is;
    }
  });
  if (!rows.active) return;  // no barrier below

  // 3. dx = a * g - b - d * (x - mean): the rows not cached last-first, then the cached ones.
  DxCoef<acc_t, V> k1, k2;
  load_dx_coef<false>(a.mean, coef, SecondInput<scalar_t, acc_t>{}, C, col, k1, k2);
  rows.streamed<U, true>([&](auto u, int64_t l) {
    dx_step<decltype(u)::value, V, V, RELU, false, RELU>(go, x, kNone, kNone, bits, dx, kNone,
                                                         base + l * C, step, k1, k2);
  });
  rows.cached<U>([&](auto u, int64_t l) {
    constexpr int UU = decltype(u)::value;
    scalar_t gv[UU][V], xv[UU][V];
#pragma unroll
    for (int j = 0; j < UU; ++j) {
      load_raw<V>(cache_g + l * C + col + j * step, gv[j]);
      load_raw<V>(cache_x + l * C + col + j * step, xv[j]);
    }
#pragma unroll
    for (int j = 0; j < UU; ++j) {
      scalar_t o[V];
#pragma unroll
      for (int i = 0; i < V; ++i) {  // as in dx_step, g already masked
        const acc_t ga = static_cast<acc_t>(gv[j][i]);
        o[i] = static_cast<scalar_t>(k1.a[i] * ga - k1.b[i] -
                                     k1.d[i] * (static_cast<acc_t>(xv[j][i]) - k1.m[i]));
      }
      store_raw<V>(dx + base + l * C + j * step, o);
    }
  });
}

}  // namespace cuda
}  // namespace fastnn
