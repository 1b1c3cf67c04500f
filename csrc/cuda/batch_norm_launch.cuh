// Host-side planning shared by the CUDA batch norm launchers: which layout the kernels see, the
// vector width, grid shapes, and the small parameter structs. No device code here.
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>

#include "batch_norm_common.h"
#include "batch_norm_kernels.cuh"

// Runtime flags as template parameters: `relu`/`residual` cost nothing when off.
#define FASTNN_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                     \
    if (COND) {                             \
      constexpr bool NAME = true;           \
      return __VA_ARGS__();                 \
    } else {                                \
      constexpr bool NAME = false;          \
      return __VA_ARGS__();                 \
    }                                       \
  }()

// The vector width: VMAX elements (16 bytes) when possible, else scalar accesses.
#define FASTNN_VEC_SWITCH(USE_VEC, VMAX, NAME, ...) \
  [&] {                                             \
    if (USE_VEC) {                                  \
      constexpr int NAME = VMAX;                    \
      return __VA_ARGS__();                         \
    } else {                                        \
      constexpr int NAME = 1;                       \
      return __VA_ARGS__();                         \
    }                                               \
  }()

namespace fastnn {
namespace cuda {

// How the kernels see the input (see batch_norm_kernels.cuh): rows (C fastest: channels_last,
// rank 2, or S == 1) or planes (S fastest). A single channel is one plane of N * S elements,
// whatever the memory format, since both orders are then the same.
struct KernelLayout {
  bool rows;
  int64_t N;
  int64_t C;
  int64_t S;
};

inline KernelLayout kernel_layout(const BNShape& s) {
  KernelLayout l{s.channels_last, s.N, s.C, s.S};
  if (l.C == 1) {
    l.rows = false;
    l.S = l.N * l.S;
    l.N = 1;
  } else if (l.S == 1) {
    l.rows = true;
  }
  return l;
}

inline bool aligned16(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// True when the kernels may use 16-byte vectors: every base pointer is 16-byte aligned and, for
// rows (a thread owns V consecutive channels), C is a multiple of the vector width. Planes of any
// size are read as a scalar head, vectors and a scalar tail.
inline bool use_vectors(const KernelLayout& l, int64_t vmax,
                        std::initializer_list<const void*> ptrs) {
  if (vmax <= 1) return false;
  if (l.rows && l.C % vmax != 0) return false;
  for (const void* p : ptrs) {
    if (!aligned16(p)) return false;
  }
  return true;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Bytes of the ReLU mask of a tensor like `t` (see batch_norm_kernels.cuh): one per 16-byte vector.
inline int64_t relu_mask_numel(const at::Tensor& t) {
  return ceil_div(t.numel(), 16 / t.element_size());
}

inline int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Blocks of `kernel` that fit on one multiprocessor at kThreads threads each; computed once per
// kernel (the occupancy query is host-only and does not touch the stream).
template <typename Kernel>
int blocks_per_sm(Kernel kernel, int threads = kThreads) {
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &n, reinterpret_cast<const void*>(kernel), threads, 0));
  return std::max(n, 1);
}

inline int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

constexpr int64_t kMaxGridY = 65535;

// A streaming launch: grid, block, and the partials per channel a reduction writes (gridDim.y).
struct Launch {
  dim3 grid;
  dim3 block;
  int64_t partials;
  PlaneGeom planes;
  RowGeom rows;
};

// `resident` = blocks that run at once on the whole GPU; the grid is sized to about that many
// blocks so that reductions write few partials and a pass that re-reads the data right after a
// reduction (in reverse order) finds its tail still in L2.
inline Launch plan_planes(const KernelLayout& l, int V, int64_t resident) {
  TORCH_CHECK(l.C <= std::numeric_limits<int32_t>::max(), "fastnn: too many channels (", l.C, ")");
  Launch L{};
  PlaneGeom& g = L.planes;
  g.N = l.N;
  g.C = l.C;
  g.S = l.S;
  // Segments of at most kMaxSeg elements (a multiple of 32 * V when a plane is split, so every
  // segment starts with the plane's alignment), so that a large plane spreads over many warps.
  const int64_t kMaxSeg = int64_t{32} * kUnroll * 8 * V;
  g.segs = ceil_div(g.S, kMaxSeg);
  g.seg_len = g.S;
  if (g.segs > 1) {
    g.seg_len = ceil_div(ceil_div(g.S, g.segs), int64_t{32} * V) * (int64_t{32} * V);
    g.segs = ceil_div(g.S, g.seg_len);
  }
  g.rows = g.N * g.segs;
  // Lanes per row: a whole warp once a row has 32 vectors (or scalars), else the power of two
  // that covers its vectors, at least 8 (a scalar head or tail has up to 7 elements). A 7x7
  // float16 plane (49 elements: 7 units of 8) is then a quarter of a warp, not a warp with at
  // most 7 lanes busy.
  const int64_t units = ceil_div(g.seg_len, V);
  g.lanes = static_cast<int>(std::min<int64_t>(32, std::max<int64_t>(8, pow2_ceil(units))));
  const int64_t useful = std::min(ceil_div(g.rows * g.lanes, kThreads), kMaxGridY);
  const int64_t gy = std::max<int64_t>(1, std::min(resident / l.C, useful));
  L.grid = dim3(static_cast<unsigned>(l.C), static_cast<unsigned>(gy));
  L.block = dim3(kThreads);
  L.partials = gy;
  return L;
}

inline Launch plan_rows(const KernelLayout& l, int V, int64_t resident) {
  Launch L{};
  RowGeom& g = L.rows;
  g.R = l.N * l.S;
  g.C = l.C;
  g.Cv = l.C / V;
  const int64_t tx = std::min<int64_t>(32, pow2_ceil(g.Cv));
  const int64_t ty = kThreads / tx;
  const int64_t gx = ceil_div(g.Cv, tx);
  TORCH_CHECK(gx <= std::numeric_limits<int32_t>::max(), "fastnn: too many channels (", l.C, ")");
  const int64_t useful = std::min(ceil_div(g.R, ty), kMaxGridY);
  const int64_t gy = std::max<int64_t>(1, std::min(resident / gx, useful));
  L.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  L.block = dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  L.partials = gy;
  return L;
}

inline Launch plan(const KernelLayout& l, int V, int64_t resident) {
  return l.rows ? plan_rows(l, V, resident) : plan_planes(l, V, resident);
}

// The geometry a rows (ROWS) or planes kernel takes from its plan.
template <bool ROWS>
const auto& geometry(const Launch& L) {
  if constexpr (ROWS) {
    return L.rows;
  } else {
    return L.planes;
  }
}

// Finalize kernels (merge_partials): kFinalizeThreads a block, X channels by Y partial lanes. Y
// grows with the partials per channel P so that a thread merges at most about 4 of them (one
// round of loads) before the lanes' tree: 16 lanes (32 channels a block) up to P = 64, 64 lanes
// (8 channels) from P = 129, as rows layouts of few channels have (one partial per block: 264 at
// 64 channels on an H100), where 16 lanes merged 17 each, one after the other.
inline int64_t finalize_lanes(int64_t P) {
  return std::min<int64_t>(64, std::max<int64_t>(16, pow2_ceil(ceil_div(P, 4))));
}
inline dim3 finalize_block(int64_t P) {
  const int64_t y = finalize_lanes(P);
  return dim3(static_cast<unsigned>(kFinalizeThreads / y), static_cast<unsigned>(y));
}
inline dim3 finalize_grid(int64_t C, int64_t P) {
  return dim3(static_cast<unsigned>(ceil_div(C, kFinalizeThreads / finalize_lanes(P))));
}

// On-chip (cooperative) kernels: the rows layout's training forward and backward in one kernel
// each (bn_train_onchip_rows_kernel, bn_backward_onchip_rows_kernel), only with
// FASTNN_CUDA_ONCHIP=1 in the environment (read at each call) until they have been timed against
// the three-kernel paths on a GPU.
inline bool onchip_enabled() {
  const char* v = std::getenv("FASTNN_CUDA_ONCHIP");
  return v != nullptr && v[0] == '1' && v[1] == '\0';
}

struct OnchipPlan {
  OnchipGeom geom;
  dim3 grid;
  dim3 block;
  size_t smem;
};

// Once per kernel and device: the shared-memory allowance over 48 KB, and whether a block of
// kThreads with `max_smem` bytes of it fits on a multiprocessor (then so does one with less).
template <auto kKernel>
bool onchip_usable(int64_t max_smem) {
  static std::atomic<uint64_t> checked{0}, usable{0};
  const int dev = static_cast<int>(c10::cuda::current_device());
  if (dev < 0 || dev >= 64) return false;
  const uint64_t bit = uint64_t{1} << dev;
  if (!(checked.load() & bit)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(max_smem)));
    int resident = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &resident, reinterpret_cast<const void*>(kKernel), static_cast<int>(kThreads),
        static_cast<size_t>(max_smem)));
    if (resident >= 1) usable.fetch_or(bit);
    checked.fetch_or(bit);
  }
  return (usable.load() & bit) != 0;
}

// The plan of on-chip kernel kKernel for rows layout `l` read V wide: one block of kThreads per
// multiprocessor, (tx, kThreads / tx) with tx the power of two covering the channel vectors, rows
// split evenly over the blocks, and as many whole groups of kThreads / tx rows kept in shared
// memory as fit after `fixed_values` accumulation values (acc_size bytes each), at row_bytes a
// row. False where it does not apply: more than 32 channel vectors, no cooperative launches,
// too little shared memory.
template <auto kKernel>
bool plan_onchip(const KernelLayout& l, int64_t V, int64_t fixed_values, int64_t acc_size,
                 int64_t row_bytes, OnchipPlan& plan) {
  const int64_t Cv = l.C / V;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (!l.rows || Cv > 32 || !prop->cooperativeLaunch) return false;
  const int64_t tx = std::min<int64_t>(32, pow2_ceil(Cv));
  const int64_t ty = kThreads / tx;
  const int64_t max_smem = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  const int64_t fixed = (fixed_values + onchip_scratch(V, tx)) * acc_size;
  if (fixed > max_smem || !onchip_usable<kKernel>(max_smem)) return false;
  const int64_t G = sm_count();
  const int64_t R = l.N * l.S;
  const int64_t per_block = ceil_div(R, G);
  const int64_t fit = (max_smem - fixed) / row_bytes / ty * ty;
  const int64_t cached = std::min(fit, ceil_div(per_block, ty) * ty);
  // Every block merges the G partials of all C channels at once: as many partial lanes as
  // leave a lane for each channel (the finalize kernels' count at most), so that it is one pass
  // (at 64 channels and 132 blocks: 8 lanes of about 17 partials, loaded 4 at a time).
  const int64_t lanes = std::min(finalize_lanes(G), kThreads / pow2_ceil(l.C));
  plan.geom = OnchipGeom{R, l.C, Cv, per_block, cached, static_cast<int>(lanes)};
  plan.grid = dim3(static_cast<unsigned>(G));
  plan.block = dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  plan.smem = static_cast<size_t>(fixed + cached * row_bytes);
  return true;
}

// The cooperative launch of a plan. False, with nothing launched, when the device cannot have
// that many blocks resident for this process (fewer multiprocessors available under MPS, say).
template <typename... P, typename... A>
bool launch_onchip(void (*kernel)(P...), const OnchipPlan& plan, A&&... args) {
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  void* ptrs[sizeof...(P)];
  std::apply([&](auto&... p) {
    int i = 0;
    ((ptrs[i++] = static_cast<void*>(&p)), ...);
  }, params);
  const cudaError_t err = cudaLaunchCooperativeKernel(kernel, plan.grid, plan.block, ptrs,
                                                      plan.smem, at::cuda::getCurrentCUDAStream());
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();
    return false;
  }
  C10_CUDA_CHECK(err);
  return true;
}

inline bool defined(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A [C] tensor as read by the kernels: its dtype is either `acc` or the input's.
inline ChannelParam channel_param(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  ChannelParam p;
  if (!defined(t)) return p;
  p.ptr = t->data_ptr();
  p.stride = t->stride(0);
  p.is_acc = t->scalar_type() == acc;
  return p;
}

inline ChannelParam channel_param(const at::Tensor& t, at::ScalarType acc) {
  return channel_param(c10::optional<at::Tensor>(t), acc);
}

inline RunningStat running_stat(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  RunningStat s;
  if (!defined(t)) return s;
  s.ptr = t->data_ptr();
  s.stride = t->stride(0);
  s.is_acc = t->scalar_type() == acc;
  return s;
}

inline const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

}  // namespace cuda
}  // namespace fastnn
