// CPU kernels of the fastnn batch-norm ops (schemas in csrc/fastnn.cpp), for one input dtype:
// FASTNN_CPU_DTYPE, a c10::ScalarType name (Float, Double, BFloat16, Half). Each
// batch_norm_cpu_<dtype>.cpp compiles this file for its dtype and hands out its entry points as
// a KernelTable (batch_norm_cpu_table.h); batch_norm_cpu.cpp registers the ops.
//
// Every kernel works on the input viewed in one of two layouts:
//  - blocks: channels-first memory with a spatial size S of at least kMinBlockSpatial; each (n, c)
//    pair is a contiguous block of S values, cut into chunks that fit in L1.
//  - rows:   channels-last memory (and rank-2 input), or channels-first with a small S. The tensor
//    is a matrix of rows of W values, each column belonging to one channel: W = C (channels-last)
//    or C * S (channels-first), times a small k when that is narrower than a few vectors. A
//    partial last row ("tail") holds what does not fill a whole row.
//
// Work is cut into items whose size depends only on the shape, never on the number of threads;
// each item writes its own partial sums and the partials are merged in item order, so results
// are the same run to run and for any thread count.
//
// A training forward or backward over the blocks layout (7x7 planes included, a plane per chunk:
// see blocks_plan) whose channels each fit in a core's L2 cache goes channel-local: a thread
// takes a group of channels through both passes (statistics then normalize; gradient sums then
// d(input)), so the second pass reads from that cache what the first brought in; the same chunks
// and merge order make it bitwise the whole-tensor passes (see local_channels).
//
// Statistics: blocks: each L1-sized run of values (chunk) gets its mean and sum of squared
// deviations in one pass, as sums of deviations from a pivot (the mean of eight values sampled
// over the run) and of their squares; where that pivot is too far off for the squares to keep
// float precision (or a value is not finite) the run takes two passes, its mean and then the
// squares around it (see chunk_stats). Runs are combined with the parallel-variance formula (Chan
// et al.) in double. Rows:
// an item's first run gives each column a pivot (its float mean), the item's other runs sum
// deviations from the pivots and their squares, and a column whose pivot was too far off for
// that is redone in double (see batch_stats); items are then combined by Chan's formula. No
// E[x^2] - E[x]^2 anywhere, so a mean far larger than the spread costs no precision. The rows
// layout's runs are walked column block by column block, so each run prefetches the next.
//
// Outputs larger than a quarter of the last-level cache (counted as at most 32 MiB per CPU that
// shares it: see kMaxLastLevelPerCpu) are written with non-temporal stores: no read-for-ownership
// of the output lines and no eviction of the input the next pass reads.
//
// A training forward with ReLU (through autograd) also writes the output's ReLU mask, a bit per
// element (see relu_mask_bytes), and its backward reads that instead of the output: 1/16 of a
// bfloat16 output's bytes, 1/32 of a float32 one (not for channels-first maps under 64 values:
// see writes_relu_mask).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <initializer_list>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include "batch_norm_common.h"
#include "batch_norm_cpu_table.h"
#include "batch_norm_cpu_vec.h"

#ifndef FASTNN_CPU_DTYPE
#error "batch_norm_cpu_kernels.h is compiled through batch_norm_cpu_<dtype>.cpp (FASTNN_CPU_DTYPE)"
#endif

namespace fastnn {
namespace cpu {
namespace {

using at::Tensor;

// Runtime flags to template parameters, so residual/relu/mask cost nothing when off. (Marked
// maybe_unused: GCC does not count a use inside a nested generic lambda.)
#define FASTNN_BOOL_SWITCH(COND, NAME, ...)                \
  [&] {                                                    \
    if (COND) {                                            \
      [[maybe_unused]] constexpr static bool NAME = true;  \
      return __VA_ARGS__();                                \
    } else {                                               \
      [[maybe_unused]] constexpr static bool NAME = false; \
      return __VA_ARGS__();                                \
    }                                                      \
  }()

// The input dtype this build of the file has kernels for (see batch_norm_cpu_table.h): each entry
// point dispatches on that dtype alone; the ops route other dtypes to other builds.
#define FASTNN_DISPATCH_INPUT(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::FASTNN_CPU_DTYPE, __VA_ARGS__))

constexpr int64_t kChunkBytes = 16 * 1024;      // a run of values: stays in L1
constexpr int64_t kItemElements = 64 * 1024;    // rows layout: elements per work item
constexpr int64_t kMinBlockSpatial = 64;        // smaller channels-first S uses the rows layout
constexpr int64_t kMinRowWidth = 64;            // rows narrower than this are grouped by k
constexpr int64_t kMaxColumnBlock = 512;        // columns per item (a multiple of every unit)
constexpr int64_t kMaxSumsColumnBlock = 2048;   // the same for the gradient sums (see blocks_plan)
constexpr int64_t kSpanElements = 1024;         // rows layout: element-wise span of whole rows
constexpr int64_t kGroupMultiple = 4;           // rows layout: groups of rows, when several
constexpr int64_t kMinParallelElements = 32 * 1024;
constexpr int64_t kStreamMinBytes = 4 * 1024 * 1024;  // the least output that bypasses the cache
constexpr int64_t kPageBytes = 4096;  // hardware prefetchers do not cross a page

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Plan {
  int64_t N = 0, C = 0, S = 0;
  int64_t count = 0;  // values per channel: N * S
  bool blocks = false;
  // blocks layout
  int64_t chunk = 0;             // elements per chunk (the last chunk of a block may be shorter)
  int64_t chunks_per_block = 0;
  // rows layout: column j belongs to channel (j % P) / Sin
  int64_t P = 0, Sin = 1;        // period of the channel pattern along a row, values per channel
  int64_t W = 0, k = 1;          // row width W = k * P
  int64_t rows = 0, tail = 0;    // full rows, then `tail` values in a partial last row
  int64_t col_block = 0, col_blocks = 0;
  int64_t sub_rows = 0, group_rows = 0, groups = 0;
  // both
  int64_t items = 0, grain = 1;

  int64_t total_rows() const { return rows + (tail > 0 ? 1 : 0); }
  int64_t row_width(int64_t r) const { return r < rows ? W : tail; }
  int64_t chunk_length(int64_t kc) const { return std::min(chunk, S - kc * chunk); }
  // Full rows (the partial tail row excluded) of group g: statistics count only these.
  int64_t full_rows_in_group(int64_t g) const {
    return std::max<int64_t>(0, std::min(rows, (g + 1) * group_rows) - g * group_rows);
  }
};

template <typename T>
Plan make_plan(const BNShape& s, int64_t max_column_block = kMaxColumnBlock) {
  constexpr int64_t unit = Unit<T>::kSize;
  const int64_t chunk_elements = std::max<int64_t>(unit, kChunkBytes / int64_t(sizeof(T)));
  Plan p;
  p.N = s.N;
  p.C = s.C;
  p.S = s.S;
  p.count = s.N * s.S;
  if (s.N == 0 || s.C == 0 || s.S == 0) return p;  // empty: no work items (and no row width)
  p.blocks = !s.channels_last && s.S >= kMinBlockSpatial;
  int64_t item_elements;
  if (p.blocks) {
    const int64_t max_chunk = chunk_elements / unit * unit;
    p.chunks_per_block = divup(p.S, max_chunk);
    p.chunk = divup(divup(p.S, p.chunks_per_block), unit) * unit;
    p.chunks_per_block = divup(p.S, p.chunk);
    p.items = p.N * p.C * p.chunks_per_block;
    item_elements = p.chunk;
  } else {
    p.Sin = s.channels_last ? 1 : s.S;
    p.P = p.C * p.Sin;
    const int64_t natural_rows = s.channels_last ? s.N * s.S : s.N;
    if (p.P < kMinRowWidth) {
      p.k = std::lcm(p.P, unit) / p.P;
      while (p.P * p.k < kMinRowWidth) p.k *= 2;
    }
    p.W = p.P * p.k;
    p.rows = natural_rows / p.k;
    p.tail = (natural_rows % p.k) * p.P;
    p.col_block = std::min(p.W, max_column_block);
    p.col_blocks = divup(p.W, p.col_block);
    p.sub_rows = std::max<int64_t>(1, chunk_elements / p.col_block);
    // Groups of (nearly) equal size, as many as a multiple of kGroupMultiple when there are
    // several: a smaller last group, or one group more than the threads can share evenly, had
    // left a thread idle for up to an eighth of the statistics pass (13 groups of at most 128
    // rows for channels-last 32x512x7x7 on two threads).
    const int64_t max_group_rows =
        std::max<int64_t>(1, kItemElements / p.col_block / p.sub_rows) * p.sub_rows;
    const int64_t total_rows = p.total_rows();
    int64_t groups = divup(total_rows, max_group_rows);
    if (groups > 1) groups = std::min(total_rows, divup(groups, kGroupMultiple) * kGroupMultiple);
    p.group_rows = groups > 0 ? divup(total_rows, groups) : max_group_rows;
    p.groups = divup(total_rows, p.group_rows);
    p.items = p.groups * p.col_blocks;
    item_elements = p.group_rows * p.col_block;
  }
  p.grain = std::max<int64_t>(1, kMinParallelElements / std::max<int64_t>(1, item_elements));
  return p;
}

// The blocks layout's view of channels-first planes that make_plan gives the rows layout: one
// chunk per plane.
inline Plan plane_blocks(const Plan& p) {
  Plan q;
  q.N = p.N;
  q.C = p.C;
  q.S = p.Sin;
  q.count = p.count;
  q.blocks = true;
  q.chunk = p.Sin;
  q.chunks_per_block = 1;
  q.items = p.N * p.C;
  q.grain = std::max<int64_t>(1, kMinParallelElements / p.Sin);
  return q;
}

// The plan of the backward passes and of the channel-local training forward: make_plan's,
// except that channels-first planes of a unit up to kMinBlockSpatial values (7x7), which
// make_plan gives the rows layout, are blocks of one chunk each: their gradient sums go plane by
// plane, a float sum per plane held in registers and a channel's planes added in double
// (merge_chunk_sums), and both passes go channel-local where the blocks layout would (the
// forward's statistics of such planes are plane_stats', channel by channel). The rows layout had
// summed every (channel, position) column in memory, loading and storing both sums per vector.
// What stays the rows layout gets items of whole rows up to kMaxSumsColumnBlock values wide:
// the gradient sums over rows cut into blocks of kMaxColumnBlock columns walk memory in runs of
// part of a row, row-strided, which the hardware prefetchers follow poorly (the sums pass of
// channels-last 32x1024x7x7 float32 from memory took 0.65 ms in two column blocks, 0.56 ms in
// whole rows). The statistics keep make_plan's column blocks: their register tiles of a few
// rows lost more to whole rows than the walk gained.
template <typename T>
Plan blocks_plan(const BNShape& s) {
  const Plan p = make_plan<T>(s, kMaxSumsColumnBlock);
  if (p.blocks || p.Sin <= 1 || p.Sin < Unit<T>::kSize) return p;
  return plane_blocks(p);
}

// Columns of the rows layout in channel order: f(column, channel) for every column of the first
// `width` columns (a multiple of P), of channels [c0, c1) (all by default).
template <typename F>
inline void for_each_column(const Plan& p, int64_t width, const F& f, int64_t c0 = 0,
                            int64_t c1 = -1) {
  if (c1 < 0) c1 = p.C;
  for (int64_t i = 0; i * p.P < width; ++i)
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t s = 0; s < p.Sin; ++s) f((i * p.C + c) * p.Sin + s, c);
}

// Reductions of the rows layout's per-(group, column) partial results, in parallel: over
// ranges of columns (f(j0, j1)), then over ranges of channels (f(c0, c1)). Done on one thread,
// they took a sixth to a quarter of the statistics pass over NCHW input with 7x7 maps, whose rows
// are C * 49 columns wide.
template <typename F>
inline void parallel_columns(const Plan& p, const F& f) {
  at::parallel_for(0, p.W, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.groups)), f);
}
template <typename F>
inline void parallel_channels(const Plan& p, const F& f) {
  at::parallel_for(0, p.C, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.k * p.Sin)), f);
}

// out[i][c] = the sum over groups and over channel c's columns of parts[i] (groups x W partial
// sums), in double.
template <typename S, size_t kN>
void sum_columns_to_channels(const Plan& p, const std::array<const S*, kN>& parts,
                             const std::array<double*, kN>& out) {
  // A single group's partial sums are the columns' (the same values: 0 + s is s).
  std::vector<double> col;
  if (p.groups != 1) {
    col.assign(kN * p.W, 0.0);
    parallel_columns(p, [&](int64_t j0, int64_t j1) {
      for (size_t i = 0; i < kN; ++i) {
        double* ci = col.data() + i * p.W;
        for (int64_t g = 0; g < p.groups; ++g) {
          const S* pg = parts[i] + g * p.W;
          for (int64_t j = j0; j < j1; ++j) ci[j] += double(pg[j]);
        }
      }
    });
  }
  parallel_channels(p, [&](int64_t c0, int64_t c1) {
    for (size_t i = 0; i < kN; ++i) {
      std::fill(out[i] + c0, out[i] + c1, 0.0);
      if (p.groups != 1) {
        const double* ci = col.data() + i * p.W;
        for_each_column(p, p.W, [&](int64_t j, int64_t c) { out[i][c] += ci[j]; }, c0, c1);
      } else {
        const S* ci = parts[i];
        for_each_column(p, p.W, [&](int64_t j, int64_t c) { out[i][c] += double(ci[j]); }, c0,
                        c1);
      }
    }
  });
}

// The first `width` columns (a multiple of P) of per-channel values: one period of P columns
// (each channel's value over its Sin columns), then copies of it.
template <typename A>
std::vector<A> columns_of(const Plan& p, const A* per_channel, int64_t width) {
  std::vector<A> out(width);
  if (p.Sin == 1) {
    std::copy_n(per_channel, p.C, out.data());
  } else {
    for (int64_t c = 0; c < p.C; ++c) std::fill_n(out.data() + c * p.Sin, p.Sin, per_channel[c]);
  }
  for (int64_t j = p.P; j < width; j += p.P) std::copy_n(out.data(), p.P, out.data() + j);
  return out;
}

template <typename A>
std::vector<A> expand_columns(const Plan& p, const A* per_channel) {
  return columns_of(p, per_channel, p.W);
}

// Items of the blocks layout: f(offset, length, channel).
// The indices advance by counting, not by a division per item (a 14x14 plane is one item).
template <typename F>
inline void for_block_items(const Plan& p, int64_t begin, int64_t end, const F& f) {
  int64_t block = begin / p.chunks_per_block, kc = begin % p.chunks_per_block, c = block % p.C;
  for (int64_t t = begin; t < end; ++t) {
    f(t, block * p.S + kc * p.chunk, p.chunk_length(kc), c);
    if (++kc == p.chunks_per_block) {
      kc = 0;
      ++block;
      if (++c == p.C) c = 0;
    }
  }
}

// Rows of one item of the rows layout (the partial tail row included): f(offset, length).
template <typename F>
inline void for_item_rows(const Plan& p, int64_t t, const F& f) {
  const int64_t g = t / p.col_blocks;
  const int64_t c0 = (t % p.col_blocks) * p.col_block;
  const int64_t r_end = std::min(p.total_rows(), (g + 1) * p.group_rows);
  for (int64_t row = g * p.group_rows; row < r_end; ++row) {
    const int64_t n = std::min(p.col_block, p.row_width(row) - c0);
    if (n > 0) f(row * p.W + c0, n);
  }
}

// Element-wise passes over channels-first memory go plane by plane ((n, c) runs of S values of
// one channel, its parameters held in registers) whenever a plane holds at least one unit: the
// blocks layout, and the rows layout of channels-first input with 16 <= S < kMinBlockSpatial
// (such as 7x7), where the per-column parameter loads would cost more than the data.
template <typename T>
inline bool elementwise_by_planes(const Plan& p) {
  return p.blocks || (p.Sin > 1 && p.Sin >= Unit<T>::kSize);
}

// f(offset, length, channel) over every plane (or chunk of one), in parallel; each thread
// fences its non-temporal stores (kStream) before it leaves.
template <bool kStream, typename F>
void parallel_planes(const Plan& p, const F& f) {
  if (p.blocks) {
    at::parallel_for(0, p.items, p.grain, [&](int64_t begin, int64_t end) {
      for_block_items(p, begin, end,
                      [&](int64_t, int64_t o, int64_t n, int64_t c) { f(o, n, c); });
      if (kStream) stream_fence();
    });
    return;
  }
  const int64_t S = p.Sin;
  at::parallel_for(0, p.N * p.C, std::max<int64_t>(1, kMinParallelElements / S),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t t = begin, c = begin % p.C; t < end; ++t) {
                       f(t * S, S, c);
                       if (++c == p.C) c = 0;
                     }
                     if (kStream) stream_fence();
                   });
}

// Element-wise passes over the rows layout. With rows of at most kMaxColumnBlock values the
// tensor is periodic with period W from its start, so spans of `reps` whole rows (parameters
// expanded to reps * W columns) replace row-long ones: fewer spans, no per-row overhead on
// narrow channels-last rows. Wider rows go one row per span.
struct RowSpans {
  int64_t reps = 1;   // rows per span
  int64_t width = 0;  // parameter columns: reps * W
};

inline RowSpans row_spans(const Plan& p) {
  RowSpans rs;
  if (p.col_blocks == 1) rs.reps = std::max<int64_t>(1, kSpanElements / p.W);
  rs.width = rs.reps * p.W;
  return rs;
}

template <typename A>
std::vector<A> expand_span_columns(const Plan& p, const RowSpans& rs, const A* per_channel) {
  return columns_of(p, per_channel, rs.width);
}

// f(offset, length) over every span, in parallel, each span starting at column 0 of the
// expanded parameters; each thread fences its non-temporal stores (kStream) before it leaves.
template <bool kStream, typename F>
void parallel_row_spans(const Plan& p, const RowSpans& rs, const F& f) {
  if (p.col_blocks == 1) {
    const int64_t total = p.rows * p.W + p.tail;
    const int64_t spans = divup(total, rs.width);
    at::parallel_for(0, spans, std::max<int64_t>(1, kMinParallelElements / rs.width),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t t = begin; t < end; ++t) {
                         const int64_t o = t * rs.width;
                         f(o, std::min(rs.width, total - o));
                       }
                       if (kStream) stream_fence();
                     });
    return;
  }
  // Wide rows: each row one span (the parameters cover a whole row). Column blocks, which the
  // statistics passes use, would walk memory in row-strided runs of a few hundred values that
  // the hardware prefetchers follow poorly: whole rows made channels-last inference of
  // (32, 2048, 7, 7) bfloat16 2.1x faster (benchmarks/results/cpu-wide-rows-2026-11-29).
  const int64_t n_rows = p.total_rows();
  at::parallel_for(0, n_rows, std::max<int64_t>(1, kMinParallelElements / p.W),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) f(r * p.W, p.row_width(r));
                     if (kStream) stream_fence();
                   });
}

// Stores a unit, non-temporally when kStream (the caller has aligned the address).
template <bool kStream, typename T, typename V>
C10_ALWAYS_INLINE void put(T* p, const V& lo, const V& hi) {
  if constexpr (kStream) {
    Unit<T>::stream(p, lo, hi);
  } else {
    Unit<T>::store(p, lo, hi);
  }
}

// Number of leading elements to handle one by one so that `p` becomes stream-aligned (0 when not
// streaming).
template <bool kStream, typename T>
C10_ALWAYS_INLINE int64_t stream_head(const T* p, int64_t n) {
  if constexpr (!kStream) return 0;
  const auto misalign = reinterpret_cast<std::uintptr_t>(p) % Unit<T>::kStreamAlign;
  if (misalign == 0) return 0;
  const int64_t head = int64_t((Unit<T>::kStreamAlign - misalign) / sizeof(T));
  return std::min(head, n);
}

// A unit to p (put), or with kPartial its first `count` elements (an ordinary store).
template <bool kStream, bool kPartial, typename T, typename V>
C10_ALWAYS_INLINE void put_n(T* p, int64_t count, const V& lo, const V& hi) {
  if constexpr (kPartial) {
    Unit<T>::store_partial(p, count, lo, hi);
  } else {
    put<kStream>(p, lo, hi);
  }
}

// Whether a span's parameters P hold one value for all of it (Broadcast: one channel's plane or
// chunk), so that a vector of them serves any lanes, a partial unit's too.
template <typename P>
constexpr bool kOneChannel = false;
template <typename A>
constexpr bool kOneChannel<Broadcast<A>> = true;

// body(i, partial, count) for each whole unit of [i, n) (partial: std::false_type, count: a
// unit) and, with kTail, for the fewer values after them as one partial unit (std::true_type,
// their count): each body written once serves both. Returns where it stopped; the caller takes
// what is left (kTail false) one value at a time. 7x7 planes of bfloat16 are a unit and 17
// values: one at a time, those had cost more than the unit.
template <bool kTail, typename T, typename F>
C10_ALWAYS_INLINE int64_t for_units(int64_t i, int64_t n, const F& body) {
  using U = Unit<T>;
  for (; i + U::kSize <= n; i += U::kSize) body(i, std::false_type{}, U::kSize);
  if constexpr (kTail) {
    if (i < n) {
      body(i, std::true_type{}, n - i);
      return n;
    }
  }
  return i;
}

// ---------------------------------------------------------------------------------------------
// The ReLU mask (see relu_mask_bytes). Where a training forward writes it: nowhere (NoMaskOut)
// or through MaskWriters, from bit `first` on (MaskOut, a span's view of it from `at`, its first
// element's offset). Where a backward reads it: the forward's output, the gradient zeroed where
// it is <= 0 (OutputMask), or the bits (BitMask).

// A MaskBitWriter per thread of the parallel passes (at::get_thread_num()) over one mask; what
// they hold back is written by finish(), after the passes.
class MaskWriters {
 public:
  explicit MaskWriters(uint8_t* bits)
      : writers_(size_t(std::max(at::get_num_threads(), at::get_thread_num() + 1)),
                 MaskBitWriter(bits)) {}
  MaskBitWriter& mine() {
    const size_t t = size_t(at::get_thread_num());
    TORCH_CHECK(t < writers_.size(), "fastnn: thread ", t, " of ", writers_.size());
    return writers_[t];
  }
  void finish() {
    for (MaskBitWriter& w : writers_) w.finish();
  }

 private:
  std::vector<MaskBitWriter> writers_;
};

struct NoMaskOut {
  NoMaskOut at(int64_t) const { return {}; }
};
struct MaskOut {
  MaskWriters* writers = nullptr;
  int64_t first = 0;
  MaskBitWriter* pinned = nullptr;  // the calling thread's writer, once looked up
  MaskOut at(int64_t o) const { return {writers, first + o, pinned}; }
};

// `m` with the calling thread's writer looked up once, for the spans a thread takes in a row.
inline NoMaskOut pin(const NoMaskOut& m) { return m; }
inline MaskOut pin(const MaskOut& m) { return {m.writers, m.first, &m.writers->mine()}; }

// The calling thread's writer, positioned at the span's first bit (null: no mask).
inline MaskBitWriter* mask_writer(const NoMaskOut&) { return nullptr; }
inline MaskBitWriter* mask_writer(const MaskOut& m) {
  MaskBitWriter* w = m.pinned != nullptr ? m.pinned : &m.writers->mine();
  w->seek(m.first);
  return w;
}

template <typename T>
struct OutputMask {
  const T* out = nullptr;
  OutputMask at(int64_t o) const { return {out == nullptr ? nullptr : out + o}; }
  C10_ALWAYS_INLINE bool passes(int64_t i) const { return !(acc_t<T>(out[i]) <= acc_t<T>(0)); }
  // g's unit at i (with kPartial its first `count` values) zeroed where out <= 0.
  template <bool kPartial, typename V>
  C10_ALWAYS_INLINE void apply(int64_t i, int64_t count, V& lo, V& hi) const {
    V olo, ohi;
    Unit<T>::template load_n<kPartial>(out + i, count, olo, ohi);
    lo = mask_positive(lo, olo);
    hi = mask_positive(hi, ohi);
  }
  // The n elements `ahead` elements past i, asked for before they are read.
  C10_ALWAYS_INLINE void prefetch_ahead(int64_t i, int64_t ahead, int64_t n) const {
    prefetch_run(out + i, ahead, n);
  }
};

struct BitMask {
  const uint8_t* bits = nullptr;
  int64_t first = 0;
  BitMask at(int64_t o) const { return {bits, first + o}; }
  C10_ALWAYS_INLINE bool passes(int64_t i) const {
    const int64_t b = first + i;
    return ((bits[b >> 3] >> (b & 7)) & 1) != 0;
  }
  template <bool kPartial, typename V>
  C10_ALWAYS_INLINE void apply(int64_t i, int64_t, V& lo, V& hi) const {
    const uint32_t b = uint32_t(mask_bits_at(bits, first + i));
    lo = keep_lanes(lo, b);
    hi = keep_lanes(hi, b >> V::size());
  }
  C10_ALWAYS_INLINE void prefetch_ahead(int64_t i, int64_t ahead, int64_t n) const {
    const int64_t b = first + i + ahead;
    prefetch_run(bits + (b >> 3), 0, (n >> 3) + 1);
  }
};

// put_n, and the ReLU mask's bits of the values it stored (the first `count` with kPartial).
template <bool kStream, bool kPartial, typename T, typename V>
C10_ALWAYS_INLINE uint32_t put_n_bits(T* p, int64_t count, const V& lo, const V& hi) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    put_n<kStream, kPartial>(p, count, lo, hi);
    bits = positive_bits(lo, hi);
  } else {
    const Vectorized<T> t = Unit<T>::narrow(lo, hi);
    if constexpr (kPartial) {
      t.store(p, int(count));
    } else if constexpr (kStream) {
      Unit<T>::stream_narrowed(p, t);
    } else {
      t.store(p);
    }
    bits = nonzero_bits(t);
  }
  return kPartial ? bits & low_bits(count) : bits;
}

// ---------------------------------------------------------------------------------------------
// Element-wise spans. `P` is Broadcast (blocks) or PerColumn (rows), indexed from the span start.

// y = relu?((x - mean) * scale + shift + r?), where `M` (mean) is Zero when the mean is folded
// into shift (see ChannelAffine). `R` is PlainResidual (r is added as it is) or ResidualAffine:
// r is the input of a second batch norm, added as (r - rmean) * rscale (rmean Zero when folded).
struct PlainResidual {};
template <typename M, typename P>
struct ResidualAffine {
  M mean;
  P scale;
};
template <typename R>
constexpr bool kCentersResidual = false;
template <typename M, typename P>
constexpr bool kCentersResidual<ResidualAffine<M, P>> = !std::is_same_v<M, Zero>;

template <bool kResidual, bool kRelu, bool kStream, typename T, typename M, typename P,
          typename R = PlainResidual, typename W = NoMaskOut>
inline void forward_span(const T* x, const T* r, T* y, int64_t n, const M& mean, const P& scale,
                         const P& shift, const R& ra = R{}, const W& mask_out = W{}) {
  using U = Unit<T>;
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr bool kMaskOut = kRelu && std::is_same_v<W, MaskOut>;  // written only with ReLU
  [[maybe_unused]] MaskBitWriter* const bits = mask_writer(mask_out);
  constexpr bool kCenter = !std::is_same_v<M, Zero>;
  constexpr bool kAffine = !std::is_same_v<R, PlainResidual>;
  constexpr bool kResidualCenter = kCentersResidual<R>;
  auto one = [&](int64_t i) {
    A d = A(x[i]);
    if constexpr (kCenter) d -= mean.scalar(i);
    A v = std::fma(d, scale.scalar(i), shift.scalar(i));
    if constexpr (kResidual && kAffine) {
      A rd = A(r[i]);
      if constexpr (kResidualCenter) rd -= ra.mean.scalar(i);
      v = std::fma(rd, ra.scale.scalar(i), v);
    } else if constexpr (kResidual) {
      v += A(r[i]);
    }
    if constexpr (kRelu) v = relu(v);
    y[i] = T(v);
    if constexpr (kMaskOut) bits->put(uint32_t(!(A(y[i]) <= A(0))), 1);
  };
  int64_t i = 0;
  for (const int64_t head = stream_head<kStream>(y, n); i < head; ++i) one(i);
  i = for_units<kOneChannel<P>, T>(i, n, [&](int64_t i, auto partial, int64_t count) {
    constexpr bool kPartial = decltype(partial)::value;
    const int64_t j = i + U::kHalf;
    V lo, hi;
    U::template load_n<kPartial>(x + i, count, lo, hi);
    if constexpr (kCenter) {
      lo = lo - mean.vec(i);
      hi = hi - mean.vec(j);
    }
    lo = at::vec::fmadd(lo, scale.vec(i), shift.vec(i));
    hi = at::vec::fmadd(hi, scale.vec(j), shift.vec(j));
    if constexpr (kResidual) {
      V rlo, rhi;
      U::template load_n<kPartial>(r + i, count, rlo, rhi);
      if constexpr (kAffine) {
        if constexpr (kResidualCenter) {
          rlo = rlo - ra.mean.vec(i);
          rhi = rhi - ra.mean.vec(j);
        }
        lo = at::vec::fmadd(rlo, ra.scale.vec(i), lo);
        hi = at::vec::fmadd(rhi, ra.scale.vec(j), hi);
      } else {
        lo = lo + rlo;
        hi = hi + rhi;
      }
    }
    if constexpr (kRelu) {
      lo = relu(lo);
      hi = relu(hi);
    }
    if constexpr (kMaskOut) {
      bits->put(put_n_bits<kStream, kPartial>(y + i, count, lo, hi), int(count));
    } else {
      put_n<kStream, kPartial>(y + i, count, lo, hi);
    }
  });
  for (; i < n; ++i) one(i);
}

// The unit of the output gradient at i (with kPartial its first `count` values, zeros after
// them), zeroed by the ReLU's mask `mk` (kMask; NaN outputs pass).
template <bool kMask, bool kPartial = false, typename T, typename MK, typename V>
C10_ALWAYS_INLINE void load_grad(const T* g, const MK& mk, int64_t i, V& lo, V& hi,
                                 int64_t count = Unit<T>::kSize) {
  Unit<T>::template load_n<kPartial>(g + i, count, lo, hi);
  if constexpr (kMask) mk.template apply<kPartial>(i, count, lo, hi);
}

// Training input gradient: dx = a * (g - k1 - (x - mean) * k2), g zeroed where out <= 0 (kMask).
template <bool kMask, bool kStream, typename T, typename P, typename MK>
inline void grad_input_span(const T* g, const MK& mk, const T* x, T* dx, int64_t n, const P& mean,
                            const P& a, const P& k1, const P& k2) {
  using U = Unit<T>;
  using A = acc_t<T>;
  using V = Vectorized<A>;
  auto one = [&](int64_t i) {
    A gv = A(g[i]);
    if constexpr (kMask) gv = mk.passes(i) ? gv : A(0);
    const A d = std::fma(-(A(x[i]) - mean.scalar(i)), k2.scalar(i), gv - k1.scalar(i));
    dx[i] = T(d * a.scalar(i));
  };
  int64_t i = 0;
  for (const int64_t head = stream_head<kStream>(dx, n); i < head; ++i) one(i);
  i = for_units<kOneChannel<P>, T>(i, n, [&](int64_t i, auto partial, int64_t count) {
    constexpr bool kPartial = decltype(partial)::value;
    const int64_t j = i + U::kHalf;
    V glo, ghi, xlo, xhi;
    load_grad<kMask, kPartial>(g, mk, i, glo, ghi, count);
    U::template load_n<kPartial>(x + i, count, xlo, xhi);
    const V dlo = vec_fnmadd(xlo - mean.vec(i), k2.vec(i), glo - k1.vec(i)) * a.vec(i);
    const V dhi = vec_fnmadd(xhi - mean.vec(j), k2.vec(j), ghi - k1.vec(j)) * a.vec(j);
    put_n<kStream, kPartial>(dx + i, count, dlo, dhi);
  });
  for (; i < n; ++i) one(i);
}

// ---------------------------------------------------------------------------------------------
// Reductions.

// How much pivot-centred sums may amplify float rounding in a variance (S2 / m2, where
// S2 = m2 + n (mean - pivot)^2) before it is computed again another way: see chunk_stats and
// batch_stats.
constexpr double kMaxPivotGain = 3.0;

// Mean (in double) and sum of squared deviations of n >= 1 contiguous values in two passes (the
// second hits L1): the mean, then the squares around it.
template <typename T>
inline void chunk_stats_two_pass(const T* x, int64_t n, double& mean_out, double& m2_out) {
  using U = Unit<T>;
  using A = acc_t<T>;
  using V = Vectorized<A>;
  // An infinite or NaN pivot would turn the sum of an Inf-holding chunk into NaN, where torch's
  // mean is +-Inf: such a pivot is replaced by 0.
  const A first = A(x[0]);
  const A pivot = std::isfinite(first) ? first : A(0);
  const V vp(pivot);
  V s0(A(0)), s1(A(0)), s2(A(0)), s3(A(0));
  int64_t i = 0;
  for (; i + 2 * U::kSize <= n; i += 2 * U::kSize) {
    V a, b, c, d;
    U::load(x + i, a, b);
    U::load(x + i + U::kSize, c, d);
    s0 = s0 + (a - vp);
    s1 = s1 + (b - vp);
    s2 = s2 + (c - vp);
    s3 = s3 + (d - vp);
  }
  for (; i + U::kSize <= n; i += U::kSize) {
    V a, b;
    U::load(x + i, a, b);
    s0 = s0 + (a - vp);
    s1 = s1 + (b - vp);
  }
  A sum = horizontal_sum((s0 + s1) + (s2 + s3));
  for (; i < n; ++i) sum += A(x[i]) - pivot;
  // The mean is kept in double: rounded to float, a mean of 1e4 would be off by up to 5e-4.
  const double mean_d = double(pivot) + double(sum) / double(n);
  const A mean = A(mean_d);

  const V vm(mean);
  s0 = s1 = s2 = s3 = V(A(0));
  i = 0;
  for (; i + 2 * U::kSize <= n; i += 2 * U::kSize) {
    V a, b, c, d;
    U::load(x + i, a, b);
    U::load(x + i + U::kSize, c, d);
    a = a - vm;
    b = b - vm;
    c = c - vm;
    d = d - vm;
    s0 = at::vec::fmadd(a, a, s0);
    s1 = at::vec::fmadd(b, b, s1);
    s2 = at::vec::fmadd(c, c, s2);
    s3 = at::vec::fmadd(d, d, s3);
  }
  for (; i + U::kSize <= n; i += U::kSize) {
    V a, b;
    U::load(x + i, a, b);
    a = a - vm;
    b = b - vm;
    s0 = at::vec::fmadd(a, a, s0);
    s1 = at::vec::fmadd(b, b, s1);
  }
  A m2 = horizontal_sum((s0 + s1) + (s2 + s3));
  for (; i < n; ++i) {
    const A d = A(x[i]) - mean;
    m2 += d * d;
  }
  // The squares were taken around the rounded mean: move them to the exact one.
  const double shift = mean_d - double(mean);
  mean_out = mean_d;
  m2_out = std::max(0.0, double(m2) - double(n) * shift * shift);
}

// Mean (in double) and sum of squared deviations of n >= 1 contiguous values in one pass: sums of
// d = x - pivot and of d^2 in float, where the pivot is the mean of kPivotSamples values spread
// over the run (near the run's mean, so that S2 / m2 stays small: on Gaussian data it exceeds
// kMaxPivotGain for one run in 10,000-30,000; a single value, the first, would leave it above for
// one in six). m2 = S2 - S1^2 / n in double. A run whose gain exceeds kMaxPivotGain, or that holds
// an infinity or NaN, takes chunk_stats_two_pass. One pass and two independent horizontal sums
// instead of two passes with a horizontal sum and a division between them: on 14x14 maps (a
// chunk of 196 values) the per-chunk work had cost as much as the values.
constexpr int64_t kPivotSamples = 8;  // a power of two
static_assert(kPivotSamples == 8, "the pivot's sum is written out for 8");

// The mean of the sampled values, added as a tree: it is the first thing a pass waits for.
template <typename A>
C10_ALWAYS_INLINE A pivot_of(const A (&v)[kPivotSamples]) {
  return (((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]))) *
         A(1.0 / kPivotSamples);
}

// Adds a unit's deviations from the pivot, (lo, hi), to (s_lo, s_hi) and their squares to
// (q_lo, q_hi).
template <typename V>
C10_ALWAYS_INLINE void add_deviations(const V& lo, const V& hi, V& s_lo, V& s_hi, V& q_lo,
                                      V& q_hi) {
  s_lo = s_lo + lo;
  s_hi = s_hi + hi;
  q_lo = at::vec::fmadd(lo, lo, q_lo);
  q_hi = at::vec::fmadd(hi, hi, q_hi);
}

// The one-pass statistics described above. With `ahead` != 0 each line is asked for `ahead`
// elements before it is read (the whole-tensor pass walks its chunks in memory order, so past a
// chunk's end that is the next chunk's): on their own the hardware prefetchers kept a core's
// reads 25-35% below what it can draw from memory (a C++ model of this loop, 2 threads over
// 100 MB of 56x56 float32 planes: 18.6 GB/s, 24.8 with 4 KiB ahead).
template <typename T>
inline void chunk_stats(const T* x, int64_t n, double& mean_out, double& m2_out,
                        int64_t ahead = 0) {
  using U = Unit<T>;
  using A = acc_t<T>;
  using V = Vectorized<A>;
  A pivot;
  if (n >= kPivotSamples) {
    const int64_t stride = n / kPivotSamples;
    A v[kPivotSamples];
    for (int64_t i = 0; i < kPivotSamples; ++i) v[i] = A(x[i * stride]);
    pivot = pivot_of(v);
  } else {
    A sampled = A(0);
    for (int64_t i = 0; i < n; ++i) sampled += A(x[i]);
    pivot = sampled / A(n);
  }
  if (!std::isfinite(pivot)) return chunk_stats_two_pass(x, n, mean_out, m2_out);
  const V vp(pivot);
  V s0(A(0)), s1(A(0)), s2(A(0)), s3(A(0));
  V q0(A(0)), q1(A(0)), q2(A(0)), q3(A(0));
  int64_t i = 0;
  constexpr int64_t kLine = std::max<int64_t>(1, 64 / int64_t(sizeof(T)));
  for (; i + 2 * U::kSize <= n; i += 2 * U::kSize) {
    if (ahead != 0)
      for (int64_t l = 0; l < 2 * U::kSize; l += kLine) prefetch(x + i + l, ahead);
    V a, b, c, d;
    U::load_any_order(x + i, a, b);
    U::load_any_order(x + i + U::kSize, c, d);
    add_deviations(a - vp, b - vp, s0, s1, q0, q1);
    add_deviations(c - vp, d - vp, s2, s3, q2, q3);
  }
  for (; i + U::kSize <= n; i += U::kSize) {
    V a, b;
    U::load_any_order(x + i, a, b);
    add_deviations(a - vp, b - vp, s0, s1, q0, q1);
  }
  if (i < n) {
    // The last values (fewer than a unit) as one partial unit, its lanes past them zeroed.
    V a, b;
    U::load_partial(x + i, n - i, a, b);
    a = a - vp;
    b = b - vp;
    U::keep_first(n - i, a, b);
    add_deviations(a, b, s0, s1, q0, q1);
  }
  A sum, sq;
  horizontal_sums((s0 + s1) + (s2 + s3), (q0 + q1) + (q2 + q3), sum, sq);
  const double s = double(sum), s2d = double(sq);
  const double shift = s / double(n);
  const double m2 = s2d - s * shift;
  // Also false for NaN: an infinity or NaN among the values makes S2 one.
  if (!(s2d <= kMaxPivotGain * m2)) return chunk_stats_two_pass(x, n, mean_out, m2_out);
  mean_out = double(pivot) + shift;
  m2_out = m2;
}

// Column statistics of the rows layout, register-tiled over kU units of columns and nr rows
// (row stride W). First pass: sum[j] = sum over rows of x[r][j] - pivot[j]. The sums live in
// registers; the pivots are re-read from L1, which leaves room for four units: 256 bytes of each
// float row, whole lines, read in order. With `ahead` != 0 the same lines `ahead` elements on
// (the next run's) are prefetched: the hardware prefetchers follow this column-block walk poorly,
// and with it the channels-last statistics of 32x512x7x7 float32 from memory took 0.16 ms
// instead of 0.12.
template <int kU, typename T>
inline void tile_offset_sums(const T* x, int64_t W, int64_t nr, const acc_t<T>* pivot,
                             acc_t<T>* sum, int64_t ahead) {
  using U = Unit<T>;
  using A = acc_t<T>;
  using V = Vectorized<A>;
  V s[2 * kU];
  for (int v = 0; v < 2 * kU; ++v) s[v] = V(A(0));
  for (int64_t r = 0; r < nr; ++r) {
    const T* row = x + r * W;
    if (ahead != 0)
      for (int u = 0; u < kU; ++u) prefetch(row + u * U::kSize, ahead);
    for (int u = 0; u < kU; ++u) {
      V lo, hi;
      U::load(row + u * U::kSize, lo, hi);
      s[2 * u] = s[2 * u] + (lo - V::loadu(pivot + u * U::kSize));
      s[2 * u + 1] = s[2 * u + 1] + (hi - V::loadu(pivot + u * U::kSize + U::kHalf));
    }
  }
  for (int v = 0; v < 2 * kU; ++v) s[v].store(sum + v * V::size());
}

// Second pass: m2[j] = sum over rows of (x[r][j] - mean[j])^2.
template <int kU, typename T>
inline void tile_square_sums(const T* x, int64_t W, int64_t nr, const acc_t<T>* mean,
                             acc_t<T>* m2) {
  using U = Unit<T>;
  using A = acc_t<T>;
  using V = Vectorized<A>;
  V m[2 * kU], q[2 * kU];
  for (int v = 0; v < 2 * kU; ++v) {
    m[v] = V::loadu(mean + v * V::size());
    q[v] = V(A(0));
  }
  for (int64_t r = 0; r < nr; ++r) {
    const T* row = x + r * W;
    for (int u = 0; u < kU; ++u) {
      V lo, hi;
      U::load(row + u * U::kSize, lo, hi);
      lo = lo - m[2 * u];
      hi = hi - m[2 * u + 1];
      q[2 * u] = at::vec::fmadd(lo, lo, q[2 * u]);
      q[2 * u + 1] = at::vec::fmadd(hi, hi, q[2 * u + 1]);
    }
  }
  for (int v = 0; v < 2 * kU; ++v) q[v].store(m2 + v * V::size());
}

// tile_offset_sums over cw columns.
template <typename T>
inline void rows_offset_sums(const T* x, int64_t W, int64_t nr, int64_t cw,
                             const acc_t<T>* pivot, acc_t<T>* sum, int64_t ahead = 0) {
  using A = acc_t<T>;
  constexpr int64_t kUnit = Unit<T>::kSize;
  int64_t j = 0;
  for (; j + 4 * kUnit <= cw; j += 4 * kUnit)
    tile_offset_sums<4>(x + j, W, nr, pivot + j, sum + j, ahead);
  for (; j + 2 * kUnit <= cw; j += 2 * kUnit)
    tile_offset_sums<2>(x + j, W, nr, pivot + j, sum + j, ahead);
  for (; j + kUnit <= cw; j += kUnit) tile_offset_sums<1>(x + j, W, nr, pivot + j, sum + j, ahead);
  for (; j < cw; ++j) {
    A a = A(0);
    for (int64_t r = 0; r < nr; ++r) a += A(x[r * W + j]) - pivot[j];
    sum[j] = a;
  }
}

// tile_square_sums over cw columns.
template <typename T>
inline void rows_square_sums(const T* x, int64_t W, int64_t nr, int64_t cw, const acc_t<T>* mean,
                             acc_t<T>* m2) {
  using A = acc_t<T>;
  constexpr int64_t kUnit = Unit<T>::kSize;
  int64_t j = 0;
  for (; j + 2 * kUnit <= cw; j += 2 * kUnit) tile_square_sums<2>(x + j, W, nr, mean + j, m2 + j);
  for (; j + kUnit <= cw; j += kUnit) tile_square_sums<1>(x + j, W, nr, mean + j, m2 + j);
  for (; j < cw; ++j) {
    A q = A(0);
    for (int64_t r = 0; r < nr; ++r) {
      const A d = A(x[r * W + j]) - mean[j];
      q += d * d;
    }
    m2[j] = q;
  }
}

// Both passes over cw columns of nr rows: the first around pivot[j] = x[0][j], then the squares
// around the float mean; mean_d (double) and m2 (around the float mean) per column. `pivot` and
// `mean` are scratch of cw values.
template <typename T>
inline void rows_stats(const T* x, int64_t W, int64_t nr, int64_t cw, acc_t<T>* pivot,
                       acc_t<T>* mean, double* mean_d, acc_t<T>* m2, int64_t ahead = 0) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < cw; ++j) pivot[j] = A(x[j]);
  if (ahead != 0)
    for (int64_t j = 0; j < cw; j += 64 / int64_t(sizeof(T))) prefetch(x + j, ahead);
  if (nr > 1) {
    rows_offset_sums(x + W, W, nr - 1, cw, pivot, mean, ahead);
  } else {
    std::fill(mean, mean + cw, A(0));
  }
  const double inv_n = 1.0 / double(nr);
  for (int64_t j = 0; j < cw; ++j) {
    mean_d[j] = double(pivot[j]) + double(mean[j]) * inv_n;
    mean[j] = A(mean_d[j]);
  }
  rows_square_sums(x, W, nr, cw, mean, m2);
}

// Mean and sum of squared deviations of one column (stride W) of n rows, both passes in double.
template <typename T>
inline void column_stats_double(const T* x, int64_t W, int64_t n, double& mean_out,
                                double& m2_out) {
  double sum = 0;
  for (int64_t r = 0; r < n; ++r) sum += double(x[r * W]);
  const double mean = sum / double(n);
  double m2 = 0;
  for (int64_t r = 0; r < n; ++r) {
    const double d = double(x[r * W]) - mean;
    m2 += d * d;
  }
  mean_out = mean;
  m2_out = m2;
}


// The sums over nr rows of d = x[r][j] - pivot[j] and of d^2 over cw columns, added to s1[j] and
// s2[j] in double (`sum` and `sq` are scratch of cw values). Two passes, as in rows_stats: the
// first walks memory in tiles of four units (256 bytes of each float row, which the hardware
// prefetchers follow; one pass of both sums fits only two units in registers and ran 1.1-1.5x
// slower on input that is not in cache), the second reads the run again from L1.
template <typename T>
inline void rows_pivot_sums(const T* x, int64_t W, int64_t nr, int64_t cw,
                            const acc_t<T>* pivot, acc_t<T>* sum, acc_t<T>* sq, double* s1,
                            double* s2, int64_t ahead = 0) {
  rows_offset_sums(x, W, nr, cw, pivot, sum, ahead);
  rows_square_sums(x, W, nr, cw, pivot, sq);
  for (int64_t j = 0; j < cw; ++j) {
    s1[j] += double(sum[j]);
    s2[j] += double(sq[j]);
  }
}

// Sums of g and g * (x - mean) over n values, g zeroed where out <= 0 (kMask); on the way the
// masked g is written to gr (kGradResidual) and dx = g * a (kGradInput, eval backward). P is
// Broadcast (one channel, sums in registers) or PerColumn (sums added to the per-column arrays
// sum_g and sum_gx). With `ahead` != 0, g and x are asked for `ahead` elements before they are
// read, as chunk_stats does.
template <bool kMask, bool kGradResidual, bool kGradInput, bool kStream, typename T, typename P,
          typename MK>
inline void grad_sums_span(const T* g, const MK& mk, const T* x, T* gr, T* dx, int64_t n,
                           const P& mean, const P& a, acc_t<T>* sum_g, acc_t<T>* sum_gx,
                           int64_t ahead = 0) {
  using U = Unit<T>;
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr bool kColumns = std::is_same_v<P, PerColumn<A>>;
  constexpr bool kWrites = kGradResidual || kGradInput;
  A s = A(0), sx = A(0);
  auto one = [&](int64_t i) {
    A gv = A(g[i]);
    if constexpr (kMask) gv = mk.passes(i) ? gv : A(0);
    if constexpr (kGradResidual) gr[i] = T(gv);
    if constexpr (kGradInput) dx[i] = T(gv * a.scalar(i));
    const A gx = gv * (A(x[i]) - mean.scalar(i));
    if constexpr (kColumns) {
      sum_g[i] += gv;
      sum_gx[i] += gx;
    } else {
      s += gv;
      sx += gx;
    }
  };
  int64_t i = 0;
  if constexpr (kStream && kWrites) {
    // gr and dx are allocated alike and so share their alignment; stream only when they do.
    if (kGradResidual && kGradInput && stream_head<true>(gr, n) != stream_head<true>(dx, n)) {
      return grad_sums_span<kMask, kGradResidual, kGradInput, false>(g, mk, x, gr, dx, n, mean,
                                                                     a, sum_g, sum_gx, ahead);
    }
    for (const int64_t head = stream_head<true>(kGradResidual ? gr : dx, n); i < head; ++i) one(i);
  }
  V sg0(A(0)), sg1(A(0)), sx0(A(0)), sx1(A(0));
  i = for_units<kOneChannel<P>, T>(i, n, [&](int64_t i, auto partial, int64_t count) {
    constexpr bool kPartial = decltype(partial)::value;
    const int64_t j = i + U::kHalf;
    if (ahead != 0) {
      prefetch(g + i, ahead);
      prefetch(x + i, ahead);
    }
    V glo, ghi, xlo, xhi;
    load_grad<kMask, kPartial>(g, mk, i, glo, ghi, count);
    if constexpr (kGradResidual) put_n<kStream, kPartial>(gr + i, count, glo, ghi);
    if constexpr (kGradInput) {
      put_n<kStream, kPartial>(dx + i, count, glo * a.vec(i), ghi * a.vec(j));
    }
    U::template load_n<kPartial>(x + i, count, xlo, xhi);
    V dlo = xlo - mean.vec(i), dhi = xhi - mean.vec(j);
    if constexpr (kPartial) U::keep_first(count, dlo, dhi);
    if constexpr (kColumns) {
      (V::loadu(sum_g + i) + glo).store(sum_g + i);
      (V::loadu(sum_g + j) + ghi).store(sum_g + j);
      at::vec::fmadd(glo, dlo, V::loadu(sum_gx + i)).store(sum_gx + i);
      at::vec::fmadd(ghi, dhi, V::loadu(sum_gx + j)).store(sum_gx + j);
    } else {
      sg0 = sg0 + glo;
      sg1 = sg1 + ghi;
      sx0 = at::vec::fmadd(glo, dlo, sx0);
      sx1 = at::vec::fmadd(ghi, dhi, sx1);
    }
  });
  for (; i < n; ++i) one(i);
  if constexpr (!kColumns) {
    *sum_g = s + horizontal_sum(sg0 + sg1);
    *sum_gx = sx + horizontal_sum(sx0 + sx1);
  }
}

// The backward of batch_norm_dual, relu(bn1(x) + bn2(z)): both batch norms see the same masked
// output gradient g. Reduction: sums of g, g * (x - m1) and g * (z - m2) over n values; in eval
// (kGradInput) dx = g * a1 and dz = g * a2 are written on the way. P as in grad_sums_span.
template <bool kMask, bool kGradInput, bool kStream, typename T, typename P, typename MK>
inline void dual_grad_sums_span(const T* g, const MK& mk, const T* x, const T* z, T* dx, T* dz,
                                int64_t n, const P& m1, const P& m2, const P& a1, const P& a2,
                                acc_t<T>* sum_g, acc_t<T>* sum_gx, acc_t<T>* sum_gz) {
  using U = Unit<T>;
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr bool kColumns = std::is_same_v<P, PerColumn<A>>;
  A s = A(0), sx = A(0), sz = A(0);
  auto one = [&](int64_t i) {
    A gv = A(g[i]);
    if constexpr (kMask) gv = mk.passes(i) ? gv : A(0);
    if constexpr (kGradInput) {
      dx[i] = T(gv * a1.scalar(i));
      dz[i] = T(gv * a2.scalar(i));
    }
    const A gx = gv * (A(x[i]) - m1.scalar(i));
    const A gz = gv * (A(z[i]) - m2.scalar(i));
    if constexpr (kColumns) {
      sum_g[i] += gv;
      sum_gx[i] += gx;
      sum_gz[i] += gz;
    } else {
      s += gv;
      sx += gx;
      sz += gz;
    }
  };
  int64_t i = 0;
  if constexpr (kStream && kGradInput) {
    if (stream_head<true>(dx, n) != stream_head<true>(dz, n)) {
      return dual_grad_sums_span<kMask, kGradInput, false>(g, mk, x, z, dx, dz, n, m1, m2, a1,
                                                           a2, sum_g, sum_gx, sum_gz);
    }
    for (const int64_t head = stream_head<true>(dx, n); i < head; ++i) one(i);
  }
  V sg0(A(0)), sg1(A(0)), sx0(A(0)), sx1(A(0)), sz0(A(0)), sz1(A(0));
  i = for_units<kOneChannel<P>, T>(i, n, [&](int64_t i, auto partial, int64_t count) {
    constexpr bool kPartial = decltype(partial)::value;
    const int64_t j = i + U::kHalf;
    V glo, ghi, xlo, xhi, zlo, zhi;
    load_grad<kMask, kPartial>(g, mk, i, glo, ghi, count);
    if constexpr (kGradInput) {
      put_n<kStream, kPartial>(dx + i, count, glo * a1.vec(i), ghi * a1.vec(j));
      put_n<kStream, kPartial>(dz + i, count, glo * a2.vec(i), ghi * a2.vec(j));
    }
    U::template load_n<kPartial>(x + i, count, xlo, xhi);
    U::template load_n<kPartial>(z + i, count, zlo, zhi);
    V dxlo = xlo - m1.vec(i), dxhi = xhi - m1.vec(j);
    V dzlo = zlo - m2.vec(i), dzhi = zhi - m2.vec(j);
    if constexpr (kPartial) {
      U::keep_first(count, dxlo, dxhi);
      U::keep_first(count, dzlo, dzhi);
    }
    if constexpr (kColumns) {
      (V::loadu(sum_g + i) + glo).store(sum_g + i);
      (V::loadu(sum_g + j) + ghi).store(sum_g + j);
      at::vec::fmadd(glo, dxlo, V::loadu(sum_gx + i)).store(sum_gx + i);
      at::vec::fmadd(ghi, dxhi, V::loadu(sum_gx + j)).store(sum_gx + j);
      at::vec::fmadd(glo, dzlo, V::loadu(sum_gz + i)).store(sum_gz + i);
      at::vec::fmadd(ghi, dzhi, V::loadu(sum_gz + j)).store(sum_gz + j);
    } else {
      sg0 = sg0 + glo;
      sg1 = sg1 + ghi;
      sx0 = at::vec::fmadd(glo, dxlo, sx0);
      sx1 = at::vec::fmadd(ghi, dxhi, sx1);
      sz0 = at::vec::fmadd(glo, dzlo, sz0);
      sz1 = at::vec::fmadd(ghi, dzhi, sz1);
    }
  });
  for (; i < n; ++i) one(i);
  if constexpr (!kColumns) {
    *sum_g = s + horizontal_sum(sg0 + sg1);
    *sum_gx = sx + horizontal_sum(sx0 + sx1);
    *sum_gz = sz + horizontal_sum(sz0 + sz1);
  }
}

// Training gradients of batch_norm_dual: dx = a1 * (g - k1 - (x - m1) * k2) and
// dz = a2 * (g - k1b - (z - m2) * k2b), g zeroed where out <= 0 (kMask) and read once.
template <bool kMask, bool kStream, typename T, typename P, typename MK>
inline void dual_grad_input_span(const T* g, const MK& mk, const T* x, const T* z, T* dx, T* dz,
                                 int64_t n, const P& m1, const P& a1, const P& k1, const P& k2,
                                 const P& m2, const P& a2, const P& k1b, const P& k2b) {
  using U = Unit<T>;
  using A = acc_t<T>;
  using V = Vectorized<A>;
  auto one = [&](int64_t i) {
    A gv = A(g[i]);
    if constexpr (kMask) gv = mk.passes(i) ? gv : A(0);
    dx[i] = T(std::fma(-(A(x[i]) - m1.scalar(i)), k2.scalar(i), gv - k1.scalar(i)) *
              a1.scalar(i));
    dz[i] = T(std::fma(-(A(z[i]) - m2.scalar(i)), k2b.scalar(i), gv - k1b.scalar(i)) *
              a2.scalar(i));
  };
  int64_t i = 0;
  if constexpr (kStream) {
    if (stream_head<true>(dx, n) != stream_head<true>(dz, n)) {
      return dual_grad_input_span<kMask, false>(g, mk, x, z, dx, dz, n, m1, a1, k1, k2, m2, a2,
                                                k1b, k2b);
    }
    for (const int64_t head = stream_head<true>(dx, n); i < head; ++i) one(i);
  }
  i = for_units<kOneChannel<P>, T>(i, n, [&](int64_t i, auto partial, int64_t count) {
    constexpr bool kPartial = decltype(partial)::value;
    const int64_t j = i + U::kHalf;
    V glo, ghi, xlo, xhi, zlo, zhi;
    load_grad<kMask, kPartial>(g, mk, i, glo, ghi, count);
    U::template load_n<kPartial>(x + i, count, xlo, xhi);
    U::template load_n<kPartial>(z + i, count, zlo, zhi);
    put_n<kStream, kPartial>(
        dx + i, count, vec_fnmadd(xlo - m1.vec(i), k2.vec(i), glo - k1.vec(i)) * a1.vec(i),
        vec_fnmadd(xhi - m1.vec(j), k2.vec(j), ghi - k1.vec(j)) * a1.vec(j));
    put_n<kStream, kPartial>(
        dz + i, count, vec_fnmadd(zlo - m2.vec(i), k2b.vec(i), glo - k1b.vec(i)) * a2.vec(i),
        vec_fnmadd(zhi - m2.vec(j), k2b.vec(j), ghi - k1b.vec(j)) * a2.vec(j));
  });
  for (; i < n; ++i) one(i);
}

// ---------------------------------------------------------------------------------------------
// Drivers.

// The index of chunk kc of plane n of channel c among the blocks layout's items, as a function
// of (n, kc).
inline auto block_chunk_index(const Plan& p, int64_t c) {
  return [&p, c](int64_t n, int64_t kc) { return (n * p.C + c) * p.chunks_per_block + kc; };
}

// A channel's batch mean and biased variance from its chunks' means and sums of squared
// deviations (blocks layout), combined by Chan's formula in (plane, chunk) order; at(n, kc) is
// the index of chunk kc of plane n in pmean and pm2.
template <typename F>
inline void merge_chunk_stats(const Plan& p, const double* pmean, const double* pm2, const F& at,
                              double& mean_out, double& var_out) {
  double sum = 0;
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t kc = 0; kc < p.chunks_per_block; ++kc)
      sum += double(p.chunk_length(kc)) * pmean[at(n, kc)];
  const double mean = sum / double(p.count);
  double m2 = 0;
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t kc = 0; kc < p.chunks_per_block; ++kc) {
      const int64_t t = at(n, kc);
      const double d = pmean[t] - mean;
      m2 += pm2[t] + double(p.chunk_length(kc)) * d * d;
    }
  mean_out = mean;
  var_out = m2 / double(p.count);
}

// A channel's gradient sums over its chunks' partial sums (blocks layout), added in double in
// (plane, chunk) order; at as in merge_chunk_stats.
template <typename A, size_t kN, typename F>
inline void merge_chunk_sums(const Plan& p, const std::array<const A*, kN>& parts, const F& at,
                             const std::array<double*, kN>& out) {
  std::array<double, kN> s{};
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t kc = 0; kc < p.chunks_per_block; ++kc) {
      const int64_t t = at(n, kc);
      for (size_t i = 0; i < kN; ++i) s[i] += double(parts[i][t]);
    }
  for (size_t i = 0; i < kN; ++i) *out[i] = s[i];
}

// Statistics of channels-first input whose planes hold at least a unit but fewer than
// kMinBlockSpatial values (7x7 maps), channel by channel: one pass over the channel's N planes
// summing deviations from a pivot (the mean of kPivotSamples values sampled across its planes)
// and their squares in float vectors, moved into double every kFlushPlanes planes; a plane's last
// values (fewer than a unit) are read as one masked vector. A channel whose pivot was too far off
// (S2 / m2 > kMaxPivotGain) or that holds an infinity or NaN is done again plane by plane in two
// passes, the planes merged by Chan's formula. The rows layout had summed every (channel,
// position) column over the images and merged 49 columns per channel in double: per value, more
// work than the data.
constexpr int64_t kFlushPlanes = 8;
// How many channels ahead plane_stats asks for the planes it will read: a channel's N planes lie
// a whole image apart, a stride the hardware prefetchers do not follow. With the input in the
// last-level cache rather than L2, (32, 832, 7, 7) bfloat16 took 2.5x as long as in L2 without it.
constexpr int64_t kPrefetchChannels = 4;

// plane_stats of one channel, over a plane_blocks plan (N images of C planes of S values): the
// statistics of channel c of x, alone, so that a channel-local training forward computes them
// as the whole-tensor pass does.
template <typename T>
class PlaneChannelStats {
 public:
  explicit PlaneChannelStats(const Plan& planes) : planes_(planes) {
    // Where the pivot's samples lie relative to a channel's first value: spread over the images
    // and over the plane.
    const int64_t N = planes.N, C = planes.C, S = planes.S;
    for (int64_t i = 0; i < kPivotSamples; ++i)
      sample_[i] = (i * N / kPivotSamples) * C * S + i * S / kPivotSamples;
  }

  void operator()(const T* x, int64_t c, double& mean, double& var) const {
    using U = Unit<T>;
    using A = acc_t<T>;
    using V = Vectorized<A>;
    const int64_t N = planes_.N, C = planes_.C, S = planes_.S;
    const int64_t full = S / U::kSize * U::kSize;
    const int64_t rest = S - full;
    const T* xc = x + c * S;
    A v[kPivotSamples];
    for (int64_t i = 0; i < kPivotSamples; ++i) v[i] = A(xc[sample_[i]]);
    const A pivot = pivot_of(v);
    if (!std::isfinite(pivot)) return two_pass(x, c, mean, var);
    const V vp(pivot);
    double s1 = 0, s2 = 0;
    V a0(A(0)), a1(A(0)), a2(A(0)), a3(A(0)), b0(A(0)), b1(A(0)), b2(A(0)), b3(A(0));
    for (int64_t n = 0; n < N; ++n) {
      const T* xp = xc + n * C * S;
      prefetch_run(xp, kPrefetchChannels * S, S);
      for (int64_t i = 0; i < full; i += U::kSize) {
        V lo, hi;
        U::load_any_order(xp + i, lo, hi);
        add_deviations(lo - vp, hi - vp, a0, a1, b0, b1);
      }
      if (rest > 0) {
        // Past the plane's end the masked load reads 0: d is zeroed there.
        V lo, hi;
        U::load_partial(xp + full, rest, lo, hi);
        lo = lo - vp;
        hi = hi - vp;
        U::keep_first(rest, lo, hi);
        add_deviations(lo, hi, a2, a3, b2, b3);
      }
      if ((n + 1) % kFlushPlanes == 0 || n + 1 == N) {
        A f1, f2;
        horizontal_sums((a0 + a1) + (a2 + a3), (b0 + b1) + (b2 + b3), f1, f2);
        s1 += double(f1);
        s2 += double(f2);
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = V(A(0));
      }
    }
    const double count = double(planes_.count);
    const double shift = s1 / count;
    const double m2 = s2 - s1 * shift;
    // Also false for NaN: an infinity or NaN among the values makes s2 one.
    if (!(s2 <= kMaxPivotGain * m2)) return two_pass(x, c, mean, var);
    mean = double(pivot) + shift;
    var = m2 / count;
  }

 private:
  // The planes' means and sums of squares, merged by merge_chunk_stats with each plane a chunk
  // (the mean of the means first, which keeps an infinite mean infinite).
  void two_pass(const T* x, int64_t c, double& mean, double& var) const {
    const int64_t N = planes_.N, C = planes_.C, S = planes_.S;
    std::vector<double> pm(N), pm2(N);
    for (int64_t n = 0; n < N; ++n) chunk_stats_two_pass(x + (n * C + c) * S, S, pm[n], pm2[n]);
    merge_chunk_stats(planes_, pm.data(), pm2.data(), [](int64_t n, int64_t) { return n; }, mean,
                      var);
  }

  Plan planes_;
  std::array<int64_t, kPivotSamples> sample_{};
};

template <typename T>
void plane_stats(const Plan& p, const T* x, double* mean_c, double* var_c) {
  const PlaneChannelStats<T> stats(plane_blocks(p));
  const int64_t grain = std::max<int64_t>(1, kMinParallelElements / std::max<int64_t>(1, p.count));
  at::parallel_for(0, p.C, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) stats(x, c, mean_c[c], var_c[c]);
  });
}

// Batch mean and biased variance per channel, in double.
template <typename T>
void batch_stats(const Plan& p, const T* x, double* mean_c, double* var_c) {
  using A = acc_t<T>;
  if (p.blocks) {
    std::vector<double> pmean(p.items), pm2(p.items);
    constexpr int64_t kAhead = 4096 / int64_t(sizeof(T));  // see chunk_stats
    at::parallel_for(0, p.items, p.grain, [&](int64_t begin, int64_t end) {
      for_block_items(p, begin, end, [&](int64_t t, int64_t o, int64_t n, int64_t) {
        chunk_stats(x + o, n, pmean[t], pm2[t], kAhead);
      });
    });
    const int64_t per_channel = p.N * p.chunks_per_block;
    at::parallel_for(0, p.C, std::max<int64_t>(1, 4096 / per_channel), [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c)
        merge_chunk_stats(p, pmean.data(), pm2.data(), block_chunk_index(p, c), mean_c[c],
                          var_c[c]);
    });
    return;
  }
  if (elementwise_by_planes<T>(p)) return plane_stats(p, x, mean_c, var_c);

  // Rows layout: per item (a group of rows by a block of columns), the statistics of each column.
  // The item's first run of sub_rows rows takes both passes (rows_stats); its means, rounded to
  // float, are the pivots of the item's other runs: sums of d = x - pivot and of d^2, per run in
  // float, across runs in double. The variance m2 = S2 - S1^2 / n then carries
  // the float rounding of S2 amplified by S2 / m2 = 1 + n (mean - pivot)^2 / m2, which is near 1
  // as the first run's mean is near the item's; a column where it exceeds kMaxPivotGain (a few in
  // a hundred thousand on Gaussian data) is done again in double. Two additions per column and
  // run instead of a mean and a Chan merge in double: on channels-last 7x7 input with 512-2048
  // channels those had taken as long as the passes over the data.
  TORCH_INTERNAL_ASSERT(p.col_block <= kMaxColumnBlock,
                        "batch_stats: a plan of make_plan's column blocks");
  std::vector<double> pmean(p.groups * p.W, 0.0), pm2(p.groups * p.W, 0.0);
  at::parallel_for(0, p.items, p.grain, [&](int64_t begin, int64_t end) {
    alignas(64) A pivot[kMaxColumnBlock];
    alignas(64) A mean[kMaxColumnBlock];
    alignas(64) A m2[kMaxColumnBlock];
    alignas(64) double mean_d[kMaxColumnBlock];
    alignas(64) double s1[kMaxColumnBlock];
    alignas(64) double s2[kMaxColumnBlock];
    // Where item t starts, and the distance from `at` (run r0 of item t) to the run after it
    // (the next item's first when r0 is the item's last; none after the range's last run): what
    // the passes over a run prefetch.
    auto item_start = [&](int64_t t) {
      return x + (t / p.col_blocks) * p.group_rows * p.W + (t % p.col_blocks) * p.col_block;
    };
    auto ahead = [&](int64_t t, int64_t r0, int64_t n_rows, const T* at) -> int64_t {
      if (r0 + p.sub_rows < n_rows) return p.sub_rows * p.W;
      return t + 1 < end ? item_start(t + 1) - at : 0;
    };
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / p.col_blocks;
      const int64_t c0 = (t % p.col_blocks) * p.col_block;
      const int64_t cw = std::min(p.col_block, p.W - c0);
      const int64_t n_rows = p.full_rows_in_group(g);
      if (n_rows == 0) continue;
      const T* xi = item_start(t);
      const int64_t first = std::min(p.sub_rows, n_rows);
      rows_stats(xi, p.W, first, cw, pivot, mean, mean_d, m2, ahead(t, 0, n_rows, xi));
      for (int64_t j = 0; j < cw; ++j) {
        s1[j] = double(first) * (mean_d[j] - double(mean[j]));
        s2[j] = double(m2[j]);  // around mean[j], the pivot
      }
      for (int64_t r0 = first; r0 < n_rows; r0 += p.sub_rows) {
        const T* run = xi + r0 * p.W;
        rows_pivot_sums(run, p.W, std::min(p.sub_rows, n_rows - r0), cw, mean, pivot, m2, s1, s2,
                        ahead(t, r0, n_rows, run));
      }
      double* out_mean = pmean.data() + g * p.W + c0;
      double* out_m2 = pm2.data() + g * p.W + c0;
      const double n = double(n_rows);
      for (int64_t j = 0; j < cw; ++j) {
        const double d = s1[j] / n;
        const double m2_j = s2[j] - s1[j] * d;
        if (s2[j] <= kMaxPivotGain * m2_j) {
          out_mean[j] = double(mean[j]) + d;
          out_m2[j] = m2_j;
        } else {
          column_stats_double(xi + j, p.W, n_rows, out_mean[j], out_m2[j]);
        }
      }
    }
  });

  // Columns over groups, then channels over their columns and the tail values. A single group
  // (channels-first 7x7 maps up to batch 128) already holds the columns' statistics.
  std::vector<double> merged;
  const double* col_mean = pmean.data();
  const double* col_m2 = pm2.data();
  if (p.groups != 1) {
    merged.assign(2 * p.W, 0.0);
    double* mean_w = merged.data();
    double* m2_w = merged.data() + p.W;
    col_mean = mean_w;
    col_m2 = m2_w;
    if (p.rows > 0) {
      parallel_columns(p, [&](int64_t j0, int64_t j1) {
        for (int64_t g = 0; g < p.groups; ++g) {
          const double ng = double(p.full_rows_in_group(g));
          const double* pm = pmean.data() + g * p.W;
          for (int64_t j = j0; j < j1; ++j) mean_w[j] += ng * pm[j];
        }
        for (int64_t j = j0; j < j1; ++j) mean_w[j] /= double(p.rows);
        for (int64_t g = 0; g < p.groups; ++g) {
          const double ng = double(p.full_rows_in_group(g));
          const double* pm = pmean.data() + g * p.W;
          const double* pv = pm2.data() + g * p.W;
          for (int64_t j = j0; j < j1; ++j) {
            const double d = pm[j] - mean_w[j];
            m2_w[j] += pv[j] + ng * d * d;
          }
        }
      });
    }
  }
  const T* tail = x + p.rows * p.W;
  const double rows = double(p.rows);
  parallel_channels(p, [&](int64_t c0, int64_t c1) {
    std::fill(mean_c + c0, mean_c + c1, 0.0);
    std::fill(var_c + c0, var_c + c1, 0.0);
    for_each_column(p, p.W, [&](int64_t j, int64_t c) { mean_c[c] += rows * col_mean[j]; }, c0,
                    c1);
    for_each_column(p, p.tail, [&](int64_t j, int64_t c) { mean_c[c] += double(tail[j]); }, c0,
                    c1);
    for (int64_t c = c0; c < c1; ++c) mean_c[c] /= double(p.count);
    for_each_column(
        p, p.W,
        [&](int64_t j, int64_t c) {
          const double d = col_mean[j] - mean_c[c];
          var_c[c] += col_m2[j] + rows * d * d;
        },
        c0, c1);
    for_each_column(
        p, p.tail,
        [&](int64_t j, int64_t c) {
          const double d = double(tail[j]) - mean_c[c];
          var_c[c] += d * d;
        },
        c0, c1);
    for (int64_t c = c0; c < c1; ++c) var_c[c] /= double(p.count);
  });
}

// The per-channel parameters of the element-wise forward pass,
//   y = relu?((x - mean) * scale + shift + residual?),
// where a dual batch norm's residual is its input r, added as (r - rmean) * rscale. The means are
// float; what rounding a mean (in double) to float leaves out, mean_lo, is taken into the shift,
// shift = bias - mean_lo * scale, so that x - mean stays exact for x near the mean even when the
// mean is large against the spread (mean 1e4, std 1).
//
// Folded (y = x * scale + shift' + r * rscale, shift' = bias - mean * scale - rmean * rscale):
// decided per channel, where that loses nothing that matters (see fold_channel); a folded
// channel's means are 0, which x - 0 leaves exact. When every channel folds (`folded`), the
// element-wise pass skips the subtraction and reads two parameters per value instead of three.
template <typename A>
struct ChannelAffine {
  std::vector<A> mean, scale, shift, rmean, rscale;
  bool folded = false;
};

// How far a mean may be from zero, against the spread of the output, and still be folded into
// the shift: see fold_channel.
constexpr double kFoldLimit = 4.0;

// One channel's shift, in double and rounded once: bias minus, per batch norm k, its mean's part
// (mean_k - float(mean_k) when centered, all of mean_k when folded) times its scale. Folding
// moves the error of x - mean (exact for x near the mean) to the rounding of the shift: half a
// unit in the last place of |bias| + |mean * scale|. The output's own scale is |bias| + |weight|
// (weight = scale times the standard deviation that scale divides by), so a mean with
// |mean * scale| within kFoldLimit of that costs at most a few units of the output's rounding;
// larger means keep the centered form. Returns whether it folded.
template <typename A, size_t kK>
bool fold_channel(const std::array<double, kK>& mean, const std::array<A, kK>& scale,
                  const std::array<A, kK>& weight, const std::array<A, kK>& bias, A& shift) {
  double moved = 0, bound = 0, bias_sum = 0;
  for (size_t k = 0; k < kK; ++k) {
    moved += std::abs(mean[k] * double(scale[k]));
    bound += std::abs(double(weight[k]));
    bias_sum += double(bias[k]);
  }
  const bool fold = moved <= kFoldLimit * (std::abs(bias_sum) + bound);  // false for NaN, Inf
  double s = 0;
  for (size_t k = 0; k < kK; ++k) {
    const double part = fold ? mean[k] : mean[k] - double(A(mean[k]));
    s += double(bias[k]);
    if (part != 0) s -= part * double(scale[k]);  // not 0 * inf
  }
  shift = A(s);
  return fold;
}

// fold_channel over every channel of `q`, whose float means (q.mean, and q.rmean for a second
// batch norm) are those of `means`: sets q.shift, zeroes the folded channels' float means and
// q.folded when all fold. Returns q.folded.
template <typename A, size_t kK>
bool fold_means(ChannelAffine<A>& q, const std::array<const double*, kK>& means,
                const std::array<const std::vector<A>*, kK>& scales,
                const std::array<const std::vector<A>*, kK>& weights,
                const std::array<const std::vector<A>*, kK>& biases) {
  static_assert(kK == 1 || kK == 2, "one batch norm, or a dual one");
  const int64_t C = int64_t(q.scale.size());
  const std::array<std::vector<A>*, 2> centers = {&q.mean, &q.rmean};
  q.shift.assign(C, A(0));
  bool all = true;
  for (int64_t c = 0; c < C; ++c) {
    std::array<double, kK> m;
    std::array<A, kK> sc, w, b;
    for (size_t k = 0; k < kK; ++k) {
      m[k] = means[k][c];
      sc[k] = (*scales[k])[c];
      w[k] = (*weights[k])[c];
      b[k] = (*biases[k])[c];
    }
    if (fold_channel<A, kK>(m, sc, w, b, q.shift[c])) {
      for (size_t k = 0; k < kK; ++k) (*centers[k])[c] = A(0);
    } else {
      all = false;
    }
  }
  q.folded = all;
  return all;
}

// forward_span over one span with the parameters `at(&ChannelAffine::member)` gives (Broadcast of
// one channel, or PerColumn over expanded columns); kCenter: not folded.
template <bool kResidual, bool kRelu, bool kStream, bool kCenter, bool kAffine, typename T,
          typename F, typename W = NoMaskOut>
C10_ALWAYS_INLINE void forward_span_with(const T* x, const T* r, T* y, int64_t n, const F& at,
                                         const W& mask_out = W{}) {
  using Q = ChannelAffine<acc_t<T>>;
  const auto center = [&](auto member) {
    if constexpr (kCenter) {
      return at(member);
    } else {
      return Zero{};
    }
  };
  const auto ra = [&] {
    if constexpr (kAffine) {
      return ResidualAffine<decltype(center(&Q::rmean)), decltype(at(&Q::rscale))>{
          center(&Q::rmean), at(&Q::rscale)};
    } else {
      return PlainResidual{};
    }
  }();
  forward_span<kResidual, kRelu, kStream>(x, r, y, n, center(&Q::mean), at(&Q::scale),
                                          at(&Q::shift), ra, mask_out);
}

// The element-wise forward pass with the parameters `q` (kCenter: !q.folded); kAffine: the
// residual is a second batch norm's input (q.rmean, q.rscale). With kRelu, the output's ReLU
// mask goes to mask_out (MaskOut).
template <bool kResidual, bool kRelu, bool kStream, bool kCenter, bool kAffine = false, typename T,
          typename W = NoMaskOut>
void normalize(const Plan& p, const T* x, const T* r, T* y, const ChannelAffine<acc_t<T>>& q,
               const W& mask_out = W{}) {
  using A = acc_t<T>;
  using Q = ChannelAffine<A>;
  using Member = std::vector<A> Q::*;
  if (elementwise_by_planes<T>(p)) {
    parallel_planes<kStream>(p, [&](int64_t o, int64_t n, int64_t c) {
      forward_span_with<kResidual, kRelu, kStream, kCenter, kAffine>(
          x + o, kResidual ? r + o : nullptr, y + o, n,
          [&](Member m) { return Broadcast<A>((q.*m)[c]); }, mask_out.at(o));
    });
    return;
  }
  // Rows: the parameters that this form reads, expanded to the span's columns.
  const RowSpans rs = row_spans(p);
  const std::array<std::pair<Member, bool>, 5> used = {{{&Q::mean, kCenter},
                                                        {&Q::scale, true},
                                                        {&Q::shift, true},
                                                        {&Q::rmean, kAffine && kCenter},
                                                        {&Q::rscale, kAffine}}};
  Q wide;
  for (const auto& [m, use] : used)
    if (use) wide.*m = expand_span_columns(p, rs, (q.*m).data());
  parallel_row_spans<kStream>(p, rs, [&](int64_t o, int64_t n) {
    forward_span_with<kResidual, kRelu, kStream, kCenter, kAffine>(
        x + o, kResidual ? r + o : nullptr, y + o, n,
        [&](Member m) { return PerColumn<A>((wide.*m).data()); }, mask_out.at(o));
  });
}

// Per-channel sums of g and g * (x - mean) (g masked when kMask), in double; writes the masked
// g to gr (kGradResidual) and dx = g * a (kGradInput) on the way.
template <bool kMask, bool kGradResidual, bool kGradInput, bool kStream, typename T, typename MK>
void grad_sums(const Plan& p, const T* g, const MK& mk, const T* x, T* gr, T* dx,
               const acc_t<T>* mean, const acc_t<T>* a, double* sum_g_c, double* sum_gx_c) {
  using A = acc_t<T>;
  if (p.blocks) {
    std::vector<A> psg(p.items), psgx(p.items);
    constexpr int64_t kAhead = 4096 / int64_t(sizeof(T));  // see chunk_stats
    at::parallel_for(0, p.items, p.grain, [&](int64_t begin, int64_t end) {
      for_block_items(p, begin, end, [&](int64_t t, int64_t o, int64_t n, int64_t c) {
        grad_sums_span<kMask, kGradResidual, kGradInput, kStream>(
            g + o, mk.at(o), x + o, kGradResidual ? gr + o : nullptr,
            kGradInput ? dx + o : nullptr, n, Broadcast<A>(mean[c]), Broadcast<A>(a[c]), &psg[t],
            &psgx[t], kAhead);
      });
      if (kStream) stream_fence();
    });
    const int64_t per_channel = p.N * p.chunks_per_block;
    at::parallel_for(0, p.C, std::max<int64_t>(1, 4096 / per_channel), [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c)
        merge_chunk_sums<A, 2>(p, {psg.data(), psgx.data()}, block_chunk_index(p, c),
                               {sum_g_c + c, sum_gx_c + c});
    });
    return;
  }

  const std::vector<A> mean_w = expand_columns(p, mean);
  const std::vector<A> a_w = expand_columns(p, a);
  std::vector<A> psg(p.groups * p.W, A(0)), psgx(p.groups * p.W, A(0));
  at::parallel_for(0, p.items, p.grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = (t % p.col_blocks) * p.col_block;
      const int64_t slot = (t / p.col_blocks) * p.W + c0;
      const PerColumn<A> m(mean_w.data() + c0), av(a_w.data() + c0);
      for_item_rows(p, t, [&](int64_t o, int64_t n) {
        grad_sums_span<kMask, kGradResidual, kGradInput, kStream>(
            g + o, mk.at(o), x + o, kGradResidual ? gr + o : nullptr,
            kGradInput ? dx + o : nullptr, n, m, av, psg.data() + slot, psgx.data() + slot);
      });
    }
    if (kStream) stream_fence();
  });
  sum_columns_to_channels<A, 2>(p, {psg.data(), psgx.data()}, {sum_g_c, sum_gx_c});
}

// Training input gradient: dx = a * (g - k1 - (x - mean) * k2), g masked when kMask.
template <bool kMask, bool kStream, typename T, typename MK>
void input_grad(const Plan& p, const T* g, const MK& mk, const T* x, T* dx, const acc_t<T>* mean,
                const acc_t<T>* a, const acc_t<T>* k1, const acc_t<T>* k2) {
  using A = acc_t<T>;
  if (elementwise_by_planes<T>(p)) {
    parallel_planes<kStream>(p, [&](int64_t o, int64_t n, int64_t c) {
      grad_input_span<kMask, kStream>(g + o, mk.at(o), x + o, dx + o, n,
                                      Broadcast<A>(mean[c]), Broadcast<A>(a[c]),
                                      Broadcast<A>(k1[c]), Broadcast<A>(k2[c]));
    });
    return;
  }
  const RowSpans rs = row_spans(p);
  const std::vector<A> mean_w = expand_span_columns(p, rs, mean);
  const std::vector<A> a_w = expand_span_columns(p, rs, a);
  const std::vector<A> k1_w = expand_span_columns(p, rs, k1);
  const std::vector<A> k2_w = expand_span_columns(p, rs, k2);
  parallel_row_spans<kStream>(p, rs, [&](int64_t o, int64_t n) {
    const PerColumn<A> m(mean_w.data()), av(a_w.data()), b1(k1_w.data()),
        b2(k2_w.data());
    grad_input_span<kMask, kStream>(g + o, mk.at(o), x + o, dx + o, n, m, av,
                                    b1, b2);
  });
}

// The reduction pass of batch_norm_dual's backward: per-channel sums of g, g * (x - m1) and
// g * (z - m2) in double (g masked when kMask); dx = g * a1, dz = g * a2 written on the way in
// eval (kGradInput). The same items and merge order as grad_sums.
template <bool kMask, bool kGradInput, bool kStream, typename T, typename MK>
void dual_grad_sums(const Plan& p, const T* g, const MK& mk, const T* x, const T* z, T* dx, T* dz,
                    const acc_t<T>* m1, const acc_t<T>* m2, const acc_t<T>* a1,
                    const acc_t<T>* a2, double* sum_g_c, double* sum_gx_c, double* sum_gz_c) {
  using A = acc_t<T>;
  if (p.blocks) {
    std::vector<A> psg(p.items), psgx(p.items), psgz(p.items);
    at::parallel_for(0, p.items, p.grain, [&](int64_t begin, int64_t end) {
      for_block_items(p, begin, end, [&](int64_t t, int64_t o, int64_t n, int64_t c) {
        dual_grad_sums_span<kMask, kGradInput, kStream>(
            g + o, mk.at(o), x + o, z + o, kGradInput ? dx + o : nullptr,
            kGradInput ? dz + o : nullptr, n, Broadcast<A>(m1[c]), Broadcast<A>(m2[c]),
            Broadcast<A>(a1[c]), Broadcast<A>(a2[c]), &psg[t], &psgx[t], &psgz[t]);
      });
      if (kStream) stream_fence();
    });
    const int64_t per_channel = p.N * p.chunks_per_block;
    at::parallel_for(0, p.C, std::max<int64_t>(1, 4096 / per_channel), [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c)
        merge_chunk_sums<A, 3>(p, {psg.data(), psgx.data(), psgz.data()},
                               block_chunk_index(p, c),
                               {sum_g_c + c, sum_gx_c + c, sum_gz_c + c});
    });
    return;
  }

  const std::vector<A> m1_w = expand_columns(p, m1), m2_w = expand_columns(p, m2);
  const std::vector<A> a1_w = expand_columns(p, a1), a2_w = expand_columns(p, a2);
  std::vector<A> psg(p.groups * p.W, A(0)), psgx(p.groups * p.W, A(0)),
      psgz(p.groups * p.W, A(0));
  at::parallel_for(0, p.items, p.grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = (t % p.col_blocks) * p.col_block;
      const int64_t slot = (t / p.col_blocks) * p.W + c0;
      const PerColumn<A> pm1(m1_w.data() + c0), pm2(m2_w.data() + c0), pa1(a1_w.data() + c0),
          pa2(a2_w.data() + c0);
      for_item_rows(p, t, [&](int64_t o, int64_t n) {
        dual_grad_sums_span<kMask, kGradInput, kStream>(
            g + o, mk.at(o), x + o, z + o, kGradInput ? dx + o : nullptr,
            kGradInput ? dz + o : nullptr, n, pm1, pm2, pa1, pa2, psg.data() + slot,
            psgx.data() + slot, psgz.data() + slot);
      });
    }
    if (kStream) stream_fence();
  });
  sum_columns_to_channels<A, 3>(p, {psg.data(), psgx.data(), psgz.data()},
                                {sum_g_c, sum_gx_c, sum_gz_c});
}

// The element-wise pass of batch_norm_dual's training backward: dx and dz from one read of g.
template <bool kMask, bool kStream, typename T, typename MK>
void dual_input_grad(const Plan& p, const T* g, const MK& mk, const T* x, const T* z, T* dx,
                     T* dz, const std::vector<const acc_t<T>*>& k) {
  // k: m1, a1, k1, k2, m2, a2, k1b, k2b per channel.
  using A = acc_t<T>;
  if (elementwise_by_planes<T>(p)) {
    parallel_planes<kStream>(p, [&](int64_t o, int64_t n, int64_t c) {
      auto b = [&](int i) { return Broadcast<A>(k[i][c]); };
      dual_grad_input_span<kMask, kStream>(g + o, mk.at(o), x + o, z + o,
                                           dx + o, dz + o, n, b(0), b(1), b(2), b(3), b(4),
                                           b(5), b(6), b(7));
    });
    return;
  }
  const RowSpans rs = row_spans(p);
  std::vector<std::vector<A>> w;
  for (const A* values : k) w.push_back(expand_span_columns(p, rs, values));
  parallel_row_spans<kStream>(p, rs, [&](int64_t o, int64_t n) {
    auto b = [&](int i) { return PerColumn<A>(w[i].data()); };
    dual_grad_input_span<kMask, kStream>(g + o, mk.at(o), x + o, z + o, dx + o,
                                         dz + o, n, b(0), b(1), b(2), b(3), b(4), b(5), b(6),
                                         b(7));
  });
}

// ---------------------------------------------------------------------------------------------
// The ops.

bool defined(const c10::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// The caches cpu0 sees, from sysfs (which names the instance a core sees, one CCX on AMD, where
// sysconf can report the whole socket): the largest size of any level, the number of CPUs that
// share it, and the size of level 2 (unified or data). 0 where unknown.
struct CacheSizes {
  int64_t largest = 0, largest_cpus = 0, level2 = 0;
};

// The number of CPUs in a sysfs CPU list ("0-3,8,10-11"); 0 if it does not parse.
inline int64_t count_cpu_list(const std::string& text) {
  int64_t count = 0;
  size_t i = 0;
  while (i < text.size()) {
    char* end = nullptr;
    const long long first = std::strtoll(text.c_str() + i, &end, 10);
    if (end == text.c_str() + i || first < 0) return 0;
    long long last = first;
    i = size_t(end - text.c_str());
    if (i < text.size() && text[i] == '-') {
      const char* from = text.c_str() + i + 1;
      last = std::strtoll(from, &end, 10);
      if (end == from || last < first) return 0;
      i = size_t(end - text.c_str());
    }
    count += last - first + 1;
    if (i < text.size() && text[i] != ',') return 0;
    ++i;
  }
  return count;
}

inline int64_t parse_cache_size(std::string text) {
  if (text.empty()) return 0;
  int64_t scale = 1;
  switch (text.back()) {
    case 'K': case 'k': scale = int64_t(1) << 10; text.pop_back(); break;
    case 'M': case 'm': scale = int64_t(1) << 20; text.pop_back(); break;
    case 'G': case 'g': scale = int64_t(1) << 30; text.pop_back(); break;
    default: break;
  }
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  return end != text.c_str() && v > 0 ? int64_t(v) * scale : 0;
}

const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = [] {
    CacheSizes found;
    for (int index = 0; index < 8; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
      std::ifstream size_file(dir + "/size");
      std::string text;
      if (!(size_file >> text)) continue;
      const int64_t bytes = parse_cache_size(text);
      if (bytes > found.largest) {
        found.largest = bytes;
        std::ifstream cpus_file(dir + "/shared_cpu_list");
        std::string cpus;
        found.largest_cpus = (cpus_file >> cpus) ? count_cpu_list(cpus) : 0;
      }
      int level = 0;
      std::string type;
      std::ifstream level_file(dir + "/level"), type_file(dir + "/type");
      if ((level_file >> level) && (type_file >> type) && level == 2 && type != "Instruction")
        found.level2 = std::max(found.level2, bytes);
    }
    return found;
  }();
  return sizes;
}

// The most last-level cache counted per CPU that shares it. Processors give each core a few MiB
// (12 on AMD's stacked-cache parts, 6 per hardware thread); a virtual machine can be shown its
// host's whole cache with only its own CPUs sharing it. A 2-CPU machine shown 480 MiB of L3 read
// 27 GB/s from up to 32 MiB and 10-12 GB/s (memory) from 64 MiB on; counted as 64 MiB (outputs
// from 16 MiB streamed), its float32 training passes over 25-100 MB took 0.73-0.95x the time
// (fastnn-bench, interleaved runs), where streaming 12.8 MB outputs too had taken their forward
// 1.17-1.33x.
constexpr int64_t kMaxLastLevelPerCpu = int64_t(32) << 20;

// Size of the last-level cache one core shares with its neighbours, at most kMaxLastLevelPerCpu
// per CPU sharing it; 32 MiB when unknown.
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    const CacheSizes& found = cache_sizes();
    int64_t best = found.largest;
    if (best > 0 && found.largest_cpus > 0)
      best = std::min(best, found.largest_cpus * kMaxLastLevelPerCpu);
#if (defined(__unix__) || defined(__APPLE__)) && defined(_SC_LEVEL3_CACHE_SIZE)
    if (best == 0) best = std::max<int64_t>(0, sysconf(_SC_LEVEL3_CACHE_SIZE));
#endif
    return best > 0 ? best : int64_t(32) << 20;
  }();
  return bytes;
}

// Size of a core's level-2 cache; 1 MiB when unknown.
int64_t level2_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t best = cache_sizes().level2;
#if (defined(__unix__) || defined(__APPLE__)) && defined(_SC_LEVEL2_CACHE_SIZE)
    if (best == 0) best = std::max<int64_t>(0, sysconf(_SC_LEVEL2_CACHE_SIZE));
#endif
    return best > 0 ? best : int64_t(1) << 20;
  }();
  return bytes;
}

// The least output written with non-temporal stores (see use_stream): by passes that read their
// input again (training), and by one pass over it (inference).
int64_t stream_min_bytes() { return std::max(kStreamMinBytes, last_level_cache_bytes() / 4); }
int64_t stream_min_bytes_one_pass() { return std::max(kStreamMinBytes, last_level_cache_bytes()); }

// A choice the environment can force, read at each call: "0" never, "1" always, anything else
// (or nothing) the kernels' own rule.
enum class Setting { kNever, kAlways, kAuto };
inline Setting env_setting(const char* name) {
  const char* v = std::getenv(name);
  if (v != nullptr && v[0] != '\0' && v[1] == '\0') {
    if (v[0] == '0') return Setting::kNever;
    if (v[0] == '1') return Setting::kAlways;
  }
  return Setting::kAuto;
}

// Non-temporal stores pay off once the output, with the input read alongside it, would push the
// data a following op reads out of the last-level cache; below that the output is better left in
// the cache, where its lines often still are from the previous call. They are used only when
// every span a kernel writes starts on a cache line of each output: a partial line written
// non-temporally costs a read-modify-write in memory (NCHW 14x14 planes are 784 bytes). A
// non-temporal store to a line still in the cache evicts it first, so an output whose memory
// was just written elsewhere (recycled) can take longer streamed: an inference of 18-49 MiB took
// 0.75-0.8x or 1.2-1.6x the cached stores' time by that, a ResNet-50 step the same time within
// its noise (benchmarks/results/cpu-stream-cached-output-2026-12-02).
// An inference (one_pass: x, and the residual or the dual form's second input, read once, y
// written once; batch_norm_eval and batch_norm_dual in eval) gains by streaming only the read for
// ownership of output lines that are not in the cache, and a network's activations mostly
// recycle memory just written; there it streams only outputs at least the size of the
// last-level cache: with outputs of 24.5 and 49 MiB recycled, its float32 calls had taken
// 1.11-1.32x the time streamed in 7 of 8 cases (fastnn-bench, both layouts, with and without the
// residual; bfloat16 within noise), a torch call after them 1.05-1.25x, and where the output's
// memory had just been written, 1.2-2.2x in most processes; alone in a process, with no other
// op's writes between its calls, the two were even
// (benchmarks/results/cpu-stream-inference-2026-12-02).
// The training passes, which read their input again, keep the lower threshold: streaming keeps
// that input in the cache for the second read.
// FASTNN_CPU_STREAM: 0, never; 1, wherever the alignment allows, whatever the size (for tests,
// and for timing one against the other).
template <typename T>
bool use_stream(const Plan& p, std::initializer_list<const Tensor*> outs, bool one_pass = false) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));
  const Setting setting = env_setting("FASTNN_CPU_STREAM");
  if (setting == Setting::kNever) return false;
  const int64_t least = setting == Setting::kAlways ? 0
                        : one_pass                  ? stream_min_bytes_one_pass()
                                                    : stream_min_bytes();
  for (const Tensor* t : outs) {
    if (!t->defined() || t->numel() == 0) continue;
    if (int64_t(t->nbytes()) < least) return false;
    if (reinterpret_cast<std::uintptr_t>(t->const_data_ptr()) % 64 != 0) return false;
  }
  if (p.blocks) return p.S % kLine == 0 && p.chunk % kLine == 0;
  // The rows layout (reductions) and, for channels-first input, planes of Sin (element-wise).
  return p.W % kLine == 0 && p.col_block % kLine == 0 && (p.Sin == 1 || p.Sin % kLine == 0);
}

// Channel-local passes. A training forward reads x for its statistics and again to normalize;
// a training backward reads g and x for its sums and again for dx. Over the whole tensor the
// second read comes from memory (or a last-level cache shared by all cores). Channels-first
// input whose channels each fit in a core's level-2 cache is instead taken a group of channels
// at a time, by one thread, through both passes: the second reads what the first has just
// brought into that cache (the forward moves 2Nb instead of 3Nb, the backward 3Nb instead of
// 5Nb). Each chunk's partial result and each channel's merge order are the whole-tensor passes',
// so the outputs are bitwise the same either way (and for any number of threads).
// FASTNN_CPU_CHANNEL_LOCAL (env_setting): 0, never; 1, wherever a channel fits (for tests and
// for timing them against the whole-tensor passes); otherwise where they should be faster (see
// local_channels).

// Channels per group of a channel-local training pass that reads from memory `streams` tensors
// of the input's size (those its first pass touches, and the forward's residual) and writes
// `outputs` more through the cache in its second pass (0 where they are streamed), or 0 where
// the whole-tensor passes are used: not the blocks layout, a channel larger than half the
// level-2 cache, fewer than two channels per thread, or tensors whose share of each thread fits
// in that half (the whole-tensor passes then find them there, and read memory in longer runs).
// Counted with x alone, the BN+add+ReLU forward of 1-2 MB inputs had kept the whole-tensor
// passes: on 2 cores with 2 MB of L2 each, 1.10-1.26x the channel-local time in bfloat16
// (32x512x7x7 1.22x), 0.98-1.07x in float32.
//
// A group's tensors (read and written) fill about an eighth of the level-2 cache, and at least
// a page of each image's run of its planes (the hardware prefetchers stop at page boundaries),
// within half that cache for what the first pass reads. Groups that filled half of it had the
// second pass find less of them there: on 2 MB of L2, the training forward of 32x256x28x28
// float32 took 1.25x the time in groups of ten channels (1 MB of x) as in single channels
// (100 KB of x, 200 KB with y), of 32x512x14x14 1.33x in groups of 32 channels as in groups of
// four, the backward of 32x256x28x28 1.19x in groups of five (g and x) as in single channels;
// groups of 200-400 KB in all were the fastest in both. There are at least eight groups
// per thread where the channels allow, and a multiple of the threads (at::parallel_for hands
// each thread an equal run of groups).
template <typename T>
int64_t local_channels(const Plan& p, int64_t streams, int64_t outputs) {
  const Setting setting = env_setting("FASTNN_CPU_CHANNEL_LOCAL");
  if (!p.blocks || setting == Setting::kNever) return 0;
  const int64_t plane = p.S * int64_t(sizeof(T));
  const int64_t per_channel = p.N * plane * streams;
  const int64_t budget = level2_cache_bytes() / 2;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (per_channel > budget) return 0;
  if (setting == Setting::kAuto &&
      (p.C < 2 * threads || per_channel * p.C <= budget * threads)) {
    return 0;
  }
  const int64_t touched = p.N * plane * (streams + outputs);
  const int64_t G = std::min(
      budget / per_channel,
      std::max({int64_t(1), level2_cache_bytes() / 8 / touched, divup(kPageBytes, plane)}));
  const int64_t fewest = divup(p.C, G);
  const int64_t groups = std::min(p.C, divup(std::max(fewest, 8 * threads), threads) * threads);
  return divup(p.C, groups);
}

// f(c0, c1) for each group of G channels [c0, c1), in parallel, a thread's groups in order; each
// thread fences its non-temporal stores (kStream) before it leaves.
template <bool kStream, typename F>
void parallel_channel_groups(const Plan& p, int64_t G, const F& f) {
  const int64_t groups = divup(p.C, G);
  const int64_t grain = std::max<int64_t>(1, kMinParallelElements / (G * p.N * p.S));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i * G, std::min(p.C, (i + 1) * G));
    if (kStream) stream_fence();
  });
}

// f(offset, length, c, n, kc) over the chunks of channels [c0, c1) (blocks layout) in memory
// order: plane by plane, the group's planes of one image being contiguous.
template <typename F>
inline void for_group_chunks(const Plan& p, int64_t c0, int64_t c1, const F& f) {
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t kc = 0; kc < p.chunks_per_block; ++kc)
        f((n * p.C + c) * p.S + kc * p.chunk, p.chunk_length(kc), c, n, kc);
}

// Asks for the n values one image past t (blocks layout). The channel-local passes walk a group's
// chunks image by image: each image's run of the group's planes (a few KB) ends in a jump of a
// whole image, which the hardware prefetchers do not follow. Asking for the next image's run as
// each chunk is read, with the inputs in the last-level cache, the training forward of
// 32x64x56x56 float32 took 0.76x the time, the backward of 32x256x14x14 bfloat16 0.78x.
template <typename T>
C10_ALWAYS_INLINE void prefetch_next_image(const Plan& p, const T* t, int64_t n) {
  prefetch_run(t, p.C * p.S, n);
}

// A [C] per-channel tensor as accumulation-type values, or `fill` when absent. Read in place,
// any stride, each value converted as Tensor::to converts it: no ATen call, whose cost (a
// dispatch, and for another dtype an allocation and a copy) is a fair part of a small call's
// when the convolution before it has evicted the dispatcher's code and data from the cache.
template <typename A>
std::vector<A> channel_values(const c10::optional<Tensor>& t, int64_t C, A fill) {
  if (!defined(t)) return std::vector<A>(C, fill);
  TORCH_INTERNAL_ASSERT(t->dim() == 1 && t->size(0) == C);
  std::vector<A> v(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t->scalar_type(),
                                  "fastnn channel values (CPU)", [&] {
    const scalar_t* p = t->const_data_ptr<scalar_t>();
    const int64_t stride = t->stride(0);
    for (int64_t c = 0; c < C; ++c) v[c] = static_cast<A>(p[c * stride]);
  });
  return v;
}

// one_pass: the call reads x only here (inference; see use_stream).
template <typename T, bool kRelu, typename W = NoMaskOut>
void run_normalize(const Plan& p, const Tensor& x, const Tensor& res, Tensor& out,
                   const ChannelAffine<acc_t<T>>& q, const W& mask_out = W{},
                   bool one_pass = false) {
  const T* xp = x.const_data_ptr<T>();
  const T* rp = res.defined() ? res.const_data_ptr<T>() : nullptr;
  T* yp = out.mutable_data_ptr<T>();
  FASTNN_BOOL_SWITCH(res.defined(), kResidual, [&] {
    FASTNN_BOOL_SWITCH(use_stream<T>(p, {&out}, one_pass), kStream, [&] {
      FASTNN_BOOL_SWITCH(!q.folded, kCenter, [&] {
        normalize<kResidual, kRelu, kStream, kCenter>(p, xp, rp, yp, q, mask_out);
      });
    });
  });
}

// A channel's float mean, 1 / sqrt(var + eps) and the factor of x - mean, invstd * weight, from
// its mean and variance in double.
template <typename A>
struct ChannelScale {
  A mean, invstd, scale;
  ChannelScale(double mean_d, double var, double eps, A weight) {
    const double inv = 1.0 / std::sqrt(var + eps);
    mean = A(mean_d);
    invstd = A(inv);
    scale = A(inv * double(weight));
  }
};

// The float means and scales of a batch norm's forward pass from its mean and variance in double
// (no shift yet: see fold_means); saves the float mean and 1 / sqrt(var + eps), which the
// backward needs, to save_mean / save_invstd when given.
template <typename A>
ChannelAffine<A> channel_scales(const std::vector<double>& mean, const std::vector<double>& var,
                                double eps, const std::vector<A>& weight, A* save_mean,
                                A* save_invstd) {
  const int64_t C = int64_t(mean.size());
  ChannelAffine<A> q;
  q.mean.resize(C);
  q.scale.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    const ChannelScale<A> k(mean[c], var[c], eps, weight[c]);
    q.mean[c] = k.mean;
    q.scale[c] = k.scale;
    if (save_mean != nullptr) save_mean[c] = k.mean;
    if (save_invstd != nullptr) save_invstd[c] = k.invstd;
  }
  return q;
}

// The parameters of a batch norm's forward pass: channel_scales, then fold_means.
template <typename A>
ChannelAffine<A> channel_affine(const std::vector<double>& mean, const std::vector<double>& var,
                                double eps, const std::vector<A>& weight,
                                const std::vector<A>& bias, A* save_mean, A* save_invstd) {
  ChannelAffine<A> q = channel_scales(mean, var, eps, weight, save_mean, save_invstd);
  fold_means<A, 1>(q, {mean.data()}, {&q.scale}, {&weight}, {&bias});
  return q;
}

// running_mean = (1 - momentum) * running_mean + momentum * mean and running_var likewise with
// the unbiased variance, from the batch statistics in double, rounded once to the running
// tensors' dtype; any stride. Bumps their version counters as an in-place ATen op would.
void update_running_stats_cpu(const c10::optional<Tensor>& running_mean,
                              const c10::optional<Tensor>& running_var,
                              const std::vector<double>& mean, const std::vector<double>& var,
                              double momentum, int64_t count) {
  const double bessel = count > 1 ? double(count) / double(count - 1) : 1.0;
  auto update = [&](const c10::optional<Tensor>& t, const std::vector<double>& batch,
                    double factor) {
    if (!defined(t)) return;
    Tensor r = *t;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, r.scalar_type(), "fastnn running statistics (CPU)", [&] {
          scalar_t* d = r.mutable_data_ptr<scalar_t>();
          const int64_t stride = r.stride(0);
          for (int64_t c = 0; c < r.numel(); ++c) {
            scalar_t& v = d[c * stride];
            v = scalar_t(momentum * (batch[c] * factor) + (1.0 - momentum) * double(v));
          }
        });
    r.unsafeGetTensorImpl()->bump_version();
  };
  update(running_mean, mean, 1.0);
  update(running_var, var, bessel);
}

// One batch norm of a channel-local training forward: its parameters, and where its batch
// statistics (double) and saved statistics go.
template <typename A>
struct LocalNorm {
  const std::vector<A>& weight;
  const std::vector<A>& bias;
  double eps;
  double* mean;
  double* var;
  A* save_mean;
  A* save_invstd;
};

// The channel-local training forward (see local_channels) of kK batch norms (2: batch_norm_dual,
// whose second input is the residual), over a blocks_plan, groups of G channels: per group, the
// statistics of each chunk of each input (chunk_stats) merged into each channel's mean and
// variance (for planes shorter than kMinBlockSpatial, plane_stats' statistics of each channel),
// its parameters as channel_affine's and fold_means' (saved statistics written), then the
// normalize pass over the group's chunks.
template <size_t kK, bool kResidual, bool kRelu, bool kStream, typename T, typename W = NoMaskOut>
void train_forward_local(const Plan& p, int64_t G, const std::array<const T*, kK>& in, const T* r,
                         T* y, const std::array<LocalNorm<acc_t<T>>, kK>& bn,
                         const W& mask_out = W{}) {
  static_assert(kK == 1 || (kK == 2 && kResidual), "a second batch norm is the residual");
  using A = acc_t<T>;
  using B = Broadcast<A>;
  const bool by_planes = p.S < kMinBlockSpatial;
  const PlaneChannelStats<T> plane_stats_of(p);
  const int64_t per_channel = by_planes ? 0 : p.N * p.chunks_per_block;
  parallel_channel_groups<kStream>(p, G, [&](int64_t c0, int64_t c1) {
    std::vector<double> pmean(kK * G * per_channel), pm2(kK * G * per_channel);
    std::vector<A> mean(kK * G), scale(kK * G), shift(G);
    std::vector<uint8_t> folded(G);
    const auto at = [&](size_t k, int64_t c, int64_t n, int64_t kc) {
      return ((int64_t(k) * G + c - c0) * p.N + n) * p.chunks_per_block + kc;
    };
    if (!by_planes) {
      for_group_chunks(p, c0, c1,
                       [&](int64_t o, int64_t n, int64_t c, int64_t in_n, int64_t kc) {
                         for (size_t k = 0; k < kK; ++k) {
                           prefetch_next_image(p, in[k] + o, n);
                           const int64_t t = at(k, c, in_n, kc);
                           chunk_stats(in[k] + o, n, pmean[t], pm2[t]);
                         }
                       });
    }
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t j = c - c0;
      std::array<double, kK> m;
      std::array<A, kK> sc, w, b;
      for (size_t k = 0; k < kK; ++k) {
        const LocalNorm<A>& q = bn[k];
        if (by_planes) {
          plane_stats_of(in[k], c, q.mean[c], q.var[c]);
        } else {
          merge_chunk_stats(p, pmean.data(), pm2.data(),
                            [&](int64_t n, int64_t kc) { return at(k, c, n, kc); }, q.mean[c],
                            q.var[c]);
        }
        const ChannelScale<A> cs(q.mean[c], q.var[c], q.eps, q.weight[c]);
        q.save_mean[c] = cs.mean;
        q.save_invstd[c] = cs.invstd;
        mean[k * G + j] = cs.mean;
        scale[k * G + j] = cs.scale;
        m[k] = q.mean[c];
        sc[k] = cs.scale;
        w[k] = q.weight[c];
        b[k] = q.bias[c];
      }
      folded[j] = fold_channel<A, kK>(m, sc, w, b, shift[j]);
    }
    const auto group_mask = pin(mask_out);
    for_group_chunks(p, c0, c1, [&](int64_t o, int64_t n, int64_t c, int64_t, int64_t) {
      const int64_t j = c - c0;
      // x is in L2 from the statistics; the residual comes from memory.
      if constexpr (kResidual) prefetch_next_image(p, kK == 2 ? in[1] + o : r + o, n);
      const B sc1(scale[j]), sh(shift[j]);
      if constexpr (kK == 2) {
        const B sc2(scale[G + j]);
        if (folded[j]) {
          forward_span<true, kRelu, kStream>(in[0] + o, in[1] + o, y + o, n, Zero{}, sc1, sh,
                                             ResidualAffine<Zero, B>{Zero{}, sc2},
                                             group_mask.at(o));
        } else {
          forward_span<true, kRelu, kStream>(in[0] + o, in[1] + o, y + o, n, B(mean[j]), sc1, sh,
                                             ResidualAffine<B, B>{B(mean[G + j]), sc2},
                                             group_mask.at(o));
        }
      } else if (folded[j]) {
        forward_span<kResidual, kRelu, kStream>(in[0] + o, kResidual ? r + o : nullptr, y + o, n,
                                                Zero{}, sc1, sh, PlainResidual{}, group_mask.at(o));
      } else {
        forward_span<kResidual, kRelu, kStream>(in[0] + o, kResidual ? r + o : nullptr, y + o, n,
                                                B(mean[j]), sc1, sh, PlainResidual{},
                                                group_mask.at(o));
      }
    });
  });
}

// Whether a CPU masked forward with relu writes a mask for `input` (fastnn/ops.py's
// relu_mask_numel gives the same): not for channels-first maps of fewer than kMinBlockSpatial
// values (7x7), runs too short for the bits' arithmetic to pay: there writing the bits took the
// forward more than reading them saved the backward. With the mask, BN+ReLU forward+backward of
// 7x7 float32 maps had taken 1.13x its time without (14x14 1.06x, 56x56 and larger 0.83x;
// fastnn-bench, whose backward finds the output still in the cache; 2 cores).
bool writes_relu_mask(const Tensor& input) {
  const BNShape s = bn_shape(input);
  return !(input.dim() > 2 && s.format == at::MemoryFormat::Contiguous &&
           s.S < kMinBlockSpatial);
}

// A ReLU mask for the output of a forward of `input` (relu_mask_bytes). The bytes its last bits
// and its padding fall in are zeroed first (the forward writes only its own bits of a byte it
// does not fill): the same input gives the same bytes.
Tensor new_relu_mask(const Tensor& input) {
  const int64_t bytes = relu_mask_bytes(input.numel());
  Tensor mask = at::empty({bytes}, input.options().dtype(at::kByte));
  const int64_t tail = std::min<int64_t>(bytes, 9);
  if (tail > 0) mask.narrow(0, bytes - tail, tail).zero_();
  return mask;
}

// f(MaskOut) over `mask` where a forward with ReLU (kRelu) writes a ReLU mask (mask not empty;
// its writers' held-back bits written after f), else f(NoMaskOut). Without ReLU, f is
// instantiated for NoMaskOut alone.
template <bool kRelu, typename F>
void with_mask_out(const Tensor& mask, const F& f) {
  if constexpr (kRelu) {
    if (mask.defined() && mask.numel() > 0) {
      MaskWriters writers(mask.mutable_data_ptr<uint8_t>());
      f(MaskOut{&writers, 0});
      writers.finish();
      return;
    }
  }
  f(NoMaskOut{});
}

// The training forward; with given_mean/given_var (the input's batch statistics, computed
// elsewhere) the statistics pass is skipped. With relu, a defined `mask` (new_relu_mask) gets
// the output's ReLU mask.
std::tuple<Tensor, Tensor, Tensor> train_forward(
    const Tensor& input, const Tensor* given_mean, const Tensor* given_var,
    const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
    double momentum, double eps, const c10::optional<Tensor>& residual, bool relu,
    const Tensor& mask = Tensor()) {
  if (input.numel() == 0) return empty_batch_train(input);
  const BNShape shape = bn_shape(input);
  const Tensor x = input.contiguous(shape.format);
  const Tensor res = defined(residual) ? residual->contiguous(shape.format) : Tensor();
  Tensor out = at::empty(input.sizes(), input.options().memory_format(shape.format));
  const auto stat_options = input.options().dtype(accumulate_type(input.scalar_type()));
  Tensor save_mean = at::empty({shape.C}, stat_options);
  Tensor save_invstd = at::empty({shape.C}, stat_options);
  std::vector<double> stats_mean(shape.C), stats_var(shape.C);
  if (given_mean != nullptr) {
    stats_mean = channel_values<double>(*given_mean, shape.C, 0.0);
    stats_var = channel_values<double>(*given_var, shape.C, 0.0);
  }

  FASTNN_DISPATCH_INPUT(input.scalar_type(), "fastnn.batch_norm_train (CPU)", [&] {
    using A = acc_t<scalar_t>;
    const Plan p = make_plan<scalar_t>(shape);
    const int64_t C = shape.C;
    std::vector<double>& mean = stats_mean;
    std::vector<double>& var = stats_var;
    const std::vector<A> w = channel_values<A>(weight, C, A(1));
    const std::vector<A> b = channel_values<A>(bias, C, A(0));
    const Plan lp = blocks_plan<scalar_t>(shape);
    // Asked only where the channel-local passes may run (they take it as their output mode).
    const bool stream = given_mean == nullptr && use_stream<scalar_t>(lp, {&out});
    const int64_t G = given_mean == nullptr
                          ? local_channels<scalar_t>(lp, res.defined() ? 2 : 1, stream ? 0 : 1)
                          : 0;
    if (G > 0) {
      const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
      FASTNN_BOOL_SWITCH(res.defined(), kResidual, [&] {
        FASTNN_BOOL_SWITCH(relu, kRelu, [&] {
          FASTNN_BOOL_SWITCH(stream, kStream, [&] {
            with_mask_out<kRelu>(mask, [&](const auto& mask_out) {
              train_forward_local<1, kResidual, kRelu, kStream, scalar_t>(
                  lp, G, {x.const_data_ptr<scalar_t>()}, rp, out.mutable_data_ptr<scalar_t>(),
                  {LocalNorm<A>{w, b, eps, mean.data(), var.data(),
                                save_mean.mutable_data_ptr<A>(),
                                save_invstd.mutable_data_ptr<A>()}},
                  mask_out);
            });
          });
        });
      });
      return;
    }
    if (given_mean == nullptr)
      batch_stats<scalar_t>(p, x.const_data_ptr<scalar_t>(), mean.data(), var.data());
    const ChannelAffine<A> q =
        channel_affine(mean, var, eps, w, b, save_mean.mutable_data_ptr<A>(),
                       save_invstd.mutable_data_ptr<A>());
    FASTNN_BOOL_SWITCH(relu, kRelu, [&] {
      with_mask_out<kRelu>(mask, [&](const auto& mask_out) {
        run_normalize<scalar_t, kRelu>(p, x, res, out, q, mask_out);
      });
    });
  });
  update_running_stats_cpu(running_mean, running_var, stats_mean, stats_var, momentum,
                           shape.N * shape.S);
  return {out, save_mean, save_invstd};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_cpu(
    const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
    double momentum, double eps, const c10::optional<Tensor>& residual, bool relu) {
  check_train_args(input, weight, bias, running_mean, running_var, momentum, eps, residual);
  return train_forward(input, nullptr, nullptr, weight, bias, running_mean, running_var, momentum,
                       eps, residual, relu);
}

// batch_norm_train that also returns the output's ReLU mask (with relu; else an empty one), for
// the backward to read in place of the output (relu_mask_bytes: 1/16 of a bfloat16 output).
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_train_masked_cpu(
    const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
    double momentum, double eps, const c10::optional<Tensor>& residual, bool relu) {
  check_train_args(input, weight, bias, running_mean, running_var, momentum, eps, residual);
  const Tensor mask = relu && writes_relu_mask(input)
                          ? new_relu_mask(input)
                          : at::empty({0}, input.options().dtype(at::kByte));
  auto [out, mean, invstd] = train_forward(input, nullptr, nullptr, weight, bias, running_mean,
                                           running_var, momentum, eps, residual, relu, mask);
  return {out, mean, invstd, mask};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_with_stats_cpu(
    const Tensor& input, const Tensor& mean, const Tensor& var,
    const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
    double momentum, double eps, const c10::optional<Tensor>& residual, bool relu) {
  check_train_args(input, weight, bias, running_mean, running_var, momentum, eps, residual);
  check_stat_tensor("fastnn.batch_norm_train_with_stats", "mean", input, mean);
  check_stat_tensor("fastnn.batch_norm_train_with_stats", "var", input, var);
  return train_forward(input, &mean, &var, weight, bias, running_mean, running_var, momentum, eps,
                       residual, relu);
}

// batch_norm_train_with_stats of the concatenation of `inputs` along dim 1, each input read
// where it is and its normalized channels written into their place in the output. Channels-first:
// plane by plane ((n, c) runs of S values, parameters in registers); channels-last: each row of
// every input, its parameters per column.
std::tuple<Tensor, Tensor, Tensor> batch_norm_cat_with_stats_cpu(
    at::TensorList inputs, const Tensor& mean, const Tensor& var,
    const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
    double momentum, double eps, bool relu) {
  constexpr const char* kOp = "fastnn.batch_norm_cat_with_stats";
  const Tensor probe = check_cat_inputs(kOp, inputs);
  check_train_args(probe, weight, bias, running_mean, running_var, momentum, eps, c10::nullopt);
  check_stat_tensor(kOp, "mean", probe, mean);
  check_stat_tensor(kOp, "var", probe, var);
  const at::MemoryFormat format = cat_memory_format(inputs);
  Tensor out = at::empty(probe.sizes(), probe.options().memory_format(format));
  if (out.numel() == 0) {
    auto empty = empty_batch_train(out);
    return {out, std::get<1>(empty), std::get<2>(empty)};
  }
  const int64_t N = probe.size(0), C = probe.size(1), S = probe.numel() / (N * C);
  // Rows of C values (channels-last, or one value per channel and sample): each input's rows.
  const bool channels_last = format != at::MemoryFormat::Contiguous || S == 1;
  const int64_t K = int64_t(inputs.size());
  std::vector<Tensor> xs(K);
  std::vector<int64_t> widths(K), offsets(K), owner(C);
  for (int64_t i = 0, off = 0; i < K; ++i) {
    xs[i] = inputs[i].contiguous(format);
    widths[i] = inputs[i].size(1);
    offsets[i] = off;
    for (int64_t c = off; c < off + widths[i]; ++c) owner[c] = i;
    off += widths[i];
  }
  const auto stat_options = probe.options().dtype(accumulate_type(probe.scalar_type()));
  Tensor save_mean = at::empty({C}, stat_options);
  Tensor save_invstd = at::empty({C}, stat_options);
  const std::vector<double> mean_d = channel_values<double>(mean, C, 0.0);
  const std::vector<double> var_d = channel_values<double>(var, C, 0.0);

  FASTNN_DISPATCH_INPUT(probe.scalar_type(), "fastnn.batch_norm_cat_with_stats (CPU)", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const std::vector<A> w = channel_values<A>(weight, C, A(1));
    const std::vector<A> b = channel_values<A>(bias, C, A(0));
    const ChannelAffine<A> q =
        channel_affine(mean_d, var_d, eps, w, b, save_mean.mutable_data_ptr<A>(),
                       save_invstd.mutable_data_ptr<A>());
    using Member = std::vector<A> ChannelAffine<A>::*;
    std::vector<const T*> xp(K);
    for (int64_t i = 0; i < K; ++i) xp[i] = xs[i].const_data_ptr<T>();
    T* y = out.mutable_data_ptr<T>();
    constexpr int64_t kLine = 64 / int64_t(sizeof(T));
    const bool stream = !channels_last && S % kLine == 0 &&
                        int64_t(out.nbytes()) >= stream_min_bytes() &&
                        reinterpret_cast<std::uintptr_t>(y) % 64 == 0;
    FASTNN_BOOL_SWITCH(relu, kRelu, [&] {
      FASTNN_BOOL_SWITCH(!q.folded, kCenter, [&] {
        if (!channels_last) {
          FASTNN_BOOL_SWITCH(stream, kStream, [&] {
            at::parallel_for(
                0, N * C, std::max<int64_t>(1, kMinParallelElements / S),
                [&](int64_t begin, int64_t end) {
                  for (int64_t t = begin; t < end; ++t) {
                    const int64_t n = t / C, c = t % C, i = owner[c];
                    const T* x = xp[i] + (n * widths[i] + (c - offsets[i])) * S;
                    forward_span_with<false, kRelu, kStream, kCenter, false>(
                        x, (const T*)nullptr, y + t * S, S,
                        [&](Member m) { return Broadcast<A>((q.*m)[c]); });
                  }
                  if (kStream) stream_fence();
                });
          });
          return;
        }
        at::parallel_for(
            0, N * S, std::max<int64_t>(1, kMinParallelElements / C),
            [&](int64_t begin, int64_t end) {
              for (int64_t r = begin; r < end; ++r) {
                for (int64_t i = 0; i < K; ++i) {
                  const int64_t o = offsets[i];
                  forward_span_with<false, kRelu, false, kCenter, false>(
                      xp[i] + r * widths[i], (const T*)nullptr, y + r * C + o, widths[i],
                      [&](Member m) { return PerColumn<A>((q.*m).data() + o); });
                }
              }
            });
      });
    });
  });
  update_running_stats_cpu(running_mean, running_var, mean_d, var_d, momentum, N * S);
  return {out, save_mean, save_invstd};
}

Tensor batch_norm_eval_cpu(const Tensor& input, const c10::optional<Tensor>& weight,
                           const c10::optional<Tensor>& bias, const Tensor& running_mean,
                           const Tensor& running_var, double eps,
                           const c10::optional<Tensor>& residual, bool relu) {
  check_eval_args(input, weight, bias, running_mean, running_var, eps, residual);
  const BNShape shape = bn_shape(input);
  Tensor out = at::empty(input.sizes(), input.options().memory_format(shape.format));
  if (input.numel() == 0) return out;
  const Tensor x = input.contiguous(shape.format);
  const Tensor res = defined(residual) ? residual->contiguous(shape.format) : Tensor();
  FASTNN_DISPATCH_INPUT(input.scalar_type(), "fastnn.batch_norm_eval (CPU)", [&] {
    using A = acc_t<scalar_t>;
    const Plan p = make_plan<scalar_t>(shape);
    const int64_t C = shape.C;
    const std::vector<double> rm = channel_values<double>(running_mean, C, 0.0);
    const std::vector<double> rv = channel_values<double>(running_var, C, 1.0);
    const std::vector<A> w = channel_values<A>(weight, C, A(1));
    const std::vector<A> b = channel_values<A>(bias, C, A(0));
    const ChannelAffine<A> q = channel_affine<A>(rm, rv, eps, w, b, nullptr, nullptr);
    FASTNN_BOOL_SWITCH(relu, kRelu, [&] {
      run_normalize<scalar_t, kRelu>(p, x, res, out, q, NoMaskOut{}, /*one_pass=*/true);
    });
  });
  return out;
}

// What the backward ops read, in the input's memory format: the input, grad_output and, for
// the ReLU forms, the forward's output.
struct GradTensors {
  BNShape shape;
  Tensor x, g, out;

  GradTensors(const Tensor& grad_output, const Tensor& input,
              const c10::optional<Tensor>& output, bool relu)
      : shape(bn_shape(input)),
        x(input.contiguous(shape.format)),
        g(grad_output.contiguous(shape.format)),
        out(relu ? output->contiguous(shape.format) : Tensor()) {}

  // A tensor of the input's sizes in its memory format.
  Tensor empty_like_input() const {
    return at::empty(x.sizes(), x.options().memory_format(shape.format));
  }
  template <typename T>
  const T* out_ptr() const {
    return out.defined() ? out.const_data_ptr<T>() : nullptr;
  }
};

// The relu_mask argument of a backward with relu: null when absent or empty (the output is read),
// else the mask a masked training forward returned for this input, checked to be one.
const uint8_t* checked_relu_mask(const char* op, const c10::optional<Tensor>& relu_mask,
                                 const Tensor& input) {
  if (!relu_mask.has_value() || !relu_mask->defined() || relu_mask->numel() == 0) return nullptr;
  const Tensor& m = *relu_mask;
  const int64_t want = relu_mask_bytes(input.numel());
  TORCH_CHECK(m.scalar_type() == at::kByte && m.dim() == 1 && m.numel() == want &&
                  m.is_contiguous(),
              op, ": relu_mask must be the ReLU mask the masked training forward returned for "
              "this input (", want, " contiguous uint8 values), got ", m.scalar_type(),
              " of shape ", m.sizes());
  TORCH_CHECK(m.device() == input.device(), op, ": relu_mask is on ", m.device(),
              " but input is on ", input.device());
  return m.const_data_ptr<uint8_t>();
}

// f(mask source) of a backward: with kMask, the ReLU mask's bits where given, else the output;
// without, a source the kernels do not read (f is then instantiated once, not once per source).
template <bool kMask, typename T, typename F>
void with_mask_in(const GradTensors& in, const uint8_t* bits, const F& f) {
  if constexpr (kMask) {
    if (bits != nullptr) {
      f(BitMask{bits, 0});
      return;
    }
    f(OutputMask<T>{in.out_ptr<T>()});
  } else {
    f(OutputMask<T>{});
  }
}

// A batch norm's saved mean and invstd per channel, and invstd * weight: the factor of
// grad_output in d(input).
template <typename A>
struct GradChannels {
  std::vector<A> mean, invstd, scale;

  GradChannels(const Tensor& mean_t, const Tensor& invstd_t,
               const c10::optional<Tensor>& weight, int64_t C)
      : mean(channel_values<A>(mean_t, C, A(0))),
        invstd(channel_values<A>(invstd_t, C, A(1))),
        scale(channel_values<A>(weight, C, A(1))) {
    for (int64_t c = 0; c < C; ++c) scale[c] *= invstd[c];
  }
};

// The coefficients of d(input) in training from the reduction's per-channel sums over `count`
// values: mean(grad_output) = sum_g / count, and mean(grad_output * xhat) * invstd =
// sum_gx * invstd^2 / count (sum_gx: the sum of grad_output * (x - mean)).
template <typename A>
A mean_dy(double sum_g, int64_t count) {
  return A(sum_g / double(count));
}

template <typename A>
A mean_dy_xhat_invstd(double sum_gx, A invstd, int64_t count) {
  const double inv = double(invstd);
  return A(sum_gx * inv * inv / double(count));
}

template <typename A>
std::vector<A> mean_dy(const std::vector<double>& sum_g, int64_t count) {
  std::vector<A> k(sum_g.size());
  for (size_t c = 0; c < k.size(); ++c) k[c] = mean_dy<A>(sum_g[c], count);
  return k;
}

template <typename A>
std::vector<A> mean_dy_xhat_invstd(const std::vector<double>& sum_gx, const std::vector<A>& invstd,
                                   int64_t count) {
  std::vector<A> k(sum_gx.size());
  for (size_t c = 0; c < k.size(); ++c) k[c] = mean_dy_xhat_invstd<A>(sum_gx[c], invstd[c], count);
  return k;
}

// A channel's weight gradient, sum(g * (x - mean)) * invstd; its bias gradient is A(sum(g)).
template <typename A>
A weight_grad(double sum_gx, A invstd) {
  return A(sum_gx * double(invstd));
}

// The channel-local training backward (see local_channels), groups of G channels: per group,
// each chunk's sums (grad_sums_span, writing the masked g to gr when kGradResidual), each
// channel's sums, parameter gradients and d(input) coefficients, as the whole-tensor passes
// compute them, then the d(input) pass over the group's chunks (reading gr in place of g and
// the output when it holds the masked g).
template <bool kMask, bool kGradResidual, bool kStream, typename T, typename MK>
void train_backward_local(const Plan& p, int64_t G, const T* g, const MK& mk, const T* x, T* gr,
                          T* dx, const GradChannels<acc_t<T>>& k, acc_t<T>* grad_weight,
                          acc_t<T>* grad_bias) {
  using A = acc_t<T>;
  constexpr bool kMaskedInGr = kMask && kGradResidual;
  const int64_t per_channel = p.N * p.chunks_per_block;
  parallel_channel_groups<kStream>(p, G, [&](int64_t c0, int64_t c1) {
    std::vector<A> psg(G * per_channel), psgx(G * per_channel), k1(G), k2(G);
    const auto at = [&](int64_t c, int64_t n, int64_t kc) {
      return (c - c0) * per_channel + n * p.chunks_per_block + kc;
    };
    // gr is read again by the second pass: written through the cache.
    for_group_chunks(p, c0, c1, [&](int64_t o, int64_t n, int64_t c, int64_t in, int64_t kc) {
      prefetch_next_image(p, g + o, n);
      prefetch_next_image(p, x + o, n);
      if constexpr (kMask) mk.prefetch_ahead(o, p.C * p.S, n);
      const int64_t t = at(c, in, kc);
      grad_sums_span<kMask, kGradResidual, false, false>(
          g + o, mk.at(o), x + o, kGradResidual ? gr + o : nullptr,
          static_cast<T*>(nullptr), n, Broadcast<A>(k.mean[c]), Broadcast<A>(k.scale[c]), &psg[t],
          &psgx[t]);
    });
    for (int64_t c = c0; c < c1; ++c) {
      double sum_g = 0, sum_gx = 0;
      merge_chunk_sums<A, 2>(p, {psg.data(), psgx.data()},
                             [&](int64_t n, int64_t kc) { return at(c, n, kc); },
                             {&sum_g, &sum_gx});
      grad_bias[c] = A(sum_g);
      grad_weight[c] = weight_grad(sum_gx, k.invstd[c]);
      k1[c - c0] = mean_dy<A>(sum_g, p.count);
      k2[c - c0] = mean_dy_xhat_invstd<A>(sum_gx, k.invstd[c], p.count);
    }
    for_group_chunks(p, c0, c1, [&](int64_t o, int64_t n, int64_t c, int64_t, int64_t) {
      const int64_t j = c - c0;
      grad_input_span<kMask && !kMaskedInGr, kStream>(
          kMaskedInGr ? gr + o : g + o, mk.at(o), x + o, dx + o,
          n, Broadcast<A>(k.mean[c]), Broadcast<A>(k.scale[c]), Broadcast<A>(k1[j]),
          Broadcast<A>(k2[j]));
    });
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& output, const Tensor& mean, const Tensor& invstd, bool training,
    bool relu, bool residual_grad, const c10::optional<Tensor>& relu_mask) {
  check_backward_args(grad_output, input, weight, output, mean, invstd, relu);
  const uint8_t* bits =
      relu ? checked_relu_mask("fastnn.batch_norm_backward", relu_mask, input) : nullptr;
  const GradTensors in(grad_output, input, output, relu);
  const int64_t C = in.shape.C;
  const auto stat_options = input.options().dtype(accumulate_type(input.scalar_type()));
  Tensor grad_input = in.empty_like_input();
  Tensor grad_residual =
      residual_grad ? in.empty_like_input() : at::empty({0}, input.options());
  Tensor grad_weight = at::zeros({C}, stat_options);
  Tensor grad_bias = at::zeros({C}, stat_options);
  if (input.numel() == 0) return {grad_input, grad_weight, grad_bias, grad_residual};

  FASTNN_DISPATCH_INPUT(input.scalar_type(), "fastnn.batch_norm_backward (CPU)", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const Plan p = blocks_plan<T>(in.shape);
    const bool stream = use_stream<T>(p, {&grad_input, &grad_residual});
    const GradChannels<A> k(mean, invstd, weight, C);
    const T* gp = in.g.const_data_ptr<T>();
    const T* xp = in.x.const_data_ptr<T>();
    T* grp = residual_grad ? grad_residual.mutable_data_ptr<T>() : nullptr;
    T* dxp = grad_input.mutable_data_ptr<T>();
    A* gw = grad_weight.mutable_data_ptr<A>();
    A* gb = grad_bias.mutable_data_ptr<A>();
    // The channel-local passes' first pass touches g, x, the output (relu, unless its ReLU
    // mask is read: 1/16 of a bfloat16 output's bytes, left out) and grad_residual.
    const int64_t G =
        training ? local_channels<T>(p,
                                     2 + int64_t(relu && bits == nullptr) + int64_t(residual_grad),
                                     stream ? 0 : 1)
                 : 0;
    if (G > 0) {
      FASTNN_BOOL_SWITCH(relu, kMask, [&] {
        FASTNN_BOOL_SWITCH(residual_grad, kGradResidual, [&] {
          FASTNN_BOOL_SWITCH(stream, kStream, [&] {
            with_mask_in<kMask, T>(in, bits, [&](const auto& mk) {
              train_backward_local<kMask, kGradResidual, kStream>(p, G, gp, mk, xp, grp, dxp, k,
                                                                  gw, gb);
            });
          });
        });
      });
      return;
    }
    std::vector<double> sum_g(C), sum_gx(C);
    FASTNN_BOOL_SWITCH(relu, kMask, [&] {
      FASTNN_BOOL_SWITCH(residual_grad, kGradResidual, [&] {
        FASTNN_BOOL_SWITCH(!training, kGradInput, [&] {
          FASTNN_BOOL_SWITCH(stream, kStream, [&] {
            with_mask_in<kMask, T>(in, bits, [&](const auto& mk) {
              grad_sums<kMask, kGradResidual, kGradInput, kStream>(
                  p, gp, mk, xp, grp, dxp, k.mean.data(), k.scale.data(), sum_g.data(),
                  sum_gx.data());
            });
          });
        });
      });
    });
    for (int64_t c = 0; c < C; ++c) {
      gb[c] = A(sum_g[c]);
      gw[c] = weight_grad(sum_gx[c], k.invstd[c]);
    }
    if (!training) return;
    const std::vector<A> k1 = mean_dy<A>(sum_g, p.count);
    const std::vector<A> k2 = mean_dy_xhat_invstd<A>(sum_gx, k.invstd, p.count);
    // With relu and residual_grad the masked gradient is already in grad_residual: read it
    // instead of grad_output and output.
    const bool masked_in_gr = relu && residual_grad;
    FASTNN_BOOL_SWITCH(relu && !masked_in_gr, kMask, [&] {
      FASTNN_BOOL_SWITCH(stream, kStream, [&] {
        with_mask_in<kMask, T>(in, bits, [&](const auto& mk) {
          input_grad<kMask, kStream, T>(p, masked_in_gr ? grp : gp, mk, xp, dxp, k.mean.data(),
                                        k.scale.data(), k1.data(), k2.data());
        });
      });
    });
  });
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

// batch_norm_dual; with relu, a defined `mask` (new_relu_mask) gets the output's ReLU mask.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dual_forward(
    const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
    const Tensor& input2, const c10::optional<Tensor>& weight2,
    const c10::optional<Tensor>& bias2, const c10::optional<Tensor>& running_mean2,
    const c10::optional<Tensor>& running_var2, bool training, double momentum, double eps,
    double momentum2, double eps2, bool relu, const Tensor& mask) {
  check_dual_args(input, weight, bias, running_mean, running_var, input2, weight2, bias2,
                  running_mean2, running_var2, training, eps, eps2);
  const BNShape shape = bn_shape(input);
  const auto stat_options = input.options().dtype(accumulate_type(input.scalar_type()));
  Tensor out = at::empty(input.sizes(), input.options().memory_format(shape.format));
  Tensor mean1 = at::zeros({shape.C}, stat_options), invstd1 = at::zeros({shape.C}, stat_options);
  Tensor mean2 = at::zeros({shape.C}, stat_options), invstd2 = at::zeros({shape.C}, stat_options);
  if (training && input.numel() == 0) return {out, mean1, invstd1, mean2, invstd2};
  const Tensor x = input.contiguous(shape.format);
  const Tensor z = input2.contiguous(shape.format);
  const int64_t C = shape.C;
  std::vector<double> m1(C), v1(C), m2(C), v2(C);
  if (!training) {
    m1 = channel_values<double>(running_mean, C, 0.0);
    v1 = channel_values<double>(running_var, C, 1.0);
    m2 = channel_values<double>(running_mean2, C, 0.0);
    v2 = channel_values<double>(running_var2, C, 1.0);
  }
  FASTNN_DISPATCH_INPUT(input.scalar_type(), "fastnn.batch_norm_dual (CPU)", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const Plan p = make_plan<T>(shape);  // of no items when the input is empty
    const std::vector<A> w1 = channel_values<A>(weight, C, A(1));
    const std::vector<A> b1 = channel_values<A>(bias, C, A(0));
    const std::vector<A> w2 = channel_values<A>(weight2, C, A(1));
    const std::vector<A> b2 = channel_values<A>(bias2, C, A(0));
    const Plan lp = blocks_plan<T>(shape);
    const bool local = training && input.numel() > 0;
    const bool stream = local && use_stream<T>(lp, {&out});
    const int64_t G = local ? local_channels<T>(lp, 2, stream ? 0 : 1) : 0;
    if (G > 0) {
      FASTNN_BOOL_SWITCH(relu, kRelu, [&] {
        FASTNN_BOOL_SWITCH(stream, kStream, [&] {
          with_mask_out<kRelu>(mask, [&](const auto& mask_out) {
            train_forward_local<2, true, kRelu, kStream, T>(
                lp, G, {x.const_data_ptr<T>(), z.const_data_ptr<T>()}, nullptr,
                out.mutable_data_ptr<T>(),
                {LocalNorm<A>{w1, b1, eps, m1.data(), v1.data(), mean1.mutable_data_ptr<A>(),
                              invstd1.mutable_data_ptr<A>()},
                 LocalNorm<A>{w2, b2, eps2, m2.data(), v2.data(), mean2.mutable_data_ptr<A>(),
                              invstd2.mutable_data_ptr<A>()}},
                mask_out);
          });
        });
      });
      return;
    }
    if (training && input.numel() > 0) {
      batch_stats<T>(p, x.const_data_ptr<T>(), m1.data(), v1.data());
      batch_stats<T>(p, z.const_data_ptr<T>(), m2.data(), v2.data());
    }
    ChannelAffine<A> q = channel_scales(m1, v1, eps, w1, mean1.mutable_data_ptr<A>(),
                                        invstd1.mutable_data_ptr<A>());
    ChannelAffine<A> q2 = channel_scales(m2, v2, eps2, w2, mean2.mutable_data_ptr<A>(),
                                         invstd2.mutable_data_ptr<A>());
    q.rmean = std::move(q2.mean);
    q.rscale = std::move(q2.scale);
    fold_means<A, 2>(q, {m1.data(), m2.data()}, {&q.scale, &q.rscale}, {&w1, &w2},
                     {&b1, &b2});
    if (input.numel() == 0) return;
    // In eval, one pass over x and z (use_stream's one_pass).
    FASTNN_BOOL_SWITCH(relu, kRelu, [&] {
      FASTNN_BOOL_SWITCH(use_stream<T>(p, {&out}, !training), kStream, [&] {
        FASTNN_BOOL_SWITCH(!q.folded, kCenter, [&] {
          with_mask_out<kRelu>(mask, [&](const auto& mask_out) {
            normalize<true, kRelu, kStream, kCenter, true>(p, x.const_data_ptr<T>(),
                                                           z.const_data_ptr<T>(),
                                                           out.mutable_data_ptr<T>(), q, mask_out);
          });
        });
      });
    });
  });
  if (training) {
    const int64_t count = shape.N * shape.S;
    update_running_stats_cpu(running_mean, running_var, m1, v1, momentum, count);
    update_running_stats_cpu(running_mean2, running_var2, m2, v2, momentum2, count);
  }
  return {out, mean1, invstd1, mean2, invstd2};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> batch_norm_dual_cpu(
    const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
    const Tensor& input2, const c10::optional<Tensor>& weight2,
    const c10::optional<Tensor>& bias2, const c10::optional<Tensor>& running_mean2,
    const c10::optional<Tensor>& running_var2, bool training, double momentum, double eps,
    double momentum2, double eps2, bool relu) {
  return dual_forward(input, weight, bias, running_mean, running_var, input2, weight2, bias2,
                      running_mean2, running_var2, training, momentum, eps, momentum2, eps2, relu,
                      Tensor());
}

// batch_norm_dual that also returns the output's ReLU mask (training with relu; else an empty
// one), as batch_norm_train_masked_cpu's.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> batch_norm_dual_masked_cpu(
    const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
    const Tensor& input2, const c10::optional<Tensor>& weight2,
    const c10::optional<Tensor>& bias2, const c10::optional<Tensor>& running_mean2,
    const c10::optional<Tensor>& running_var2, bool training, double momentum, double eps,
    double momentum2, double eps2, bool relu) {
  const bool masked = relu && training && writes_relu_mask(input);
  Tensor mask = at::empty({0}, input.options().dtype(at::kByte));
  if (masked && input.numel() > 0) mask = new_relu_mask(input);
  auto [out, mean1, invstd1, mean2, invstd2] =
      dual_forward(input, weight, bias, running_mean, running_var, input2, weight2, bias2,
                   running_mean2, running_var2, training, momentum, eps, momentum2, eps2, relu,
                   mask);
  return {out, mean1, invstd1, mean2, invstd2, mask};
}

// The channel-local training backward of batch_norm_dual (see local_channels), groups of G
// channels: per group, each chunk's three sums (dual_grad_sums_span), each channel's sums,
// parameter gradients and d(input) coefficients as the whole-tensor passes compute them, then the
// pass writing dx and dz over the group's chunks.
template <bool kMask, bool kStream, typename T, typename MK>
void dual_backward_local(const Plan& p, int64_t G, const T* g, const MK& mk, const T* x,
                         const T* z, T* dx, T* dz, const GradChannels<acc_t<T>>& k1,
                         const GradChannels<acc_t<T>>& k2, acc_t<T>* grad_weight,
                         acc_t<T>* grad_bias, acc_t<T>* grad_weight2) {
  using A = acc_t<T>;
  using B = Broadcast<A>;
  const int64_t per_channel = p.N * p.chunks_per_block;
  parallel_channel_groups<kStream>(p, G, [&](int64_t c0, int64_t c1) {
    std::vector<A> psg(G * per_channel), psgx(G * per_channel), psgz(G * per_channel);
    std::vector<A> g_mean(G), gx(G), gz(G);
    const auto at = [&](int64_t c, int64_t n, int64_t kc) {
      return (c - c0) * per_channel + n * p.chunks_per_block + kc;
    };
    for_group_chunks(p, c0, c1, [&](int64_t o, int64_t n, int64_t c, int64_t in, int64_t kc) {
      prefetch_next_image(p, g + o, n);
      prefetch_next_image(p, x + o, n);
      prefetch_next_image(p, z + o, n);
      if constexpr (kMask) mk.prefetch_ahead(o, p.C * p.S, n);
      const int64_t t = at(c, in, kc);
      dual_grad_sums_span<kMask, false, false>(
          g + o, mk.at(o), x + o, z + o, static_cast<T*>(nullptr),
          static_cast<T*>(nullptr), n, B(k1.mean[c]), B(k2.mean[c]), B(k1.scale[c]),
          B(k2.scale[c]), &psg[t], &psgx[t], &psgz[t]);
    });
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t j = c - c0;
      double sum_g = 0, sum_gx = 0, sum_gz = 0;
      merge_chunk_sums<A, 3>(p, {psg.data(), psgx.data(), psgz.data()},
                             [&](int64_t n, int64_t kc) { return at(c, n, kc); },
                             {&sum_g, &sum_gx, &sum_gz});
      grad_bias[c] = A(sum_g);
      grad_weight[c] = weight_grad(sum_gx, k1.invstd[c]);
      grad_weight2[c] = weight_grad(sum_gz, k2.invstd[c]);
      g_mean[j] = mean_dy<A>(sum_g, p.count);
      gx[j] = mean_dy_xhat_invstd<A>(sum_gx, k1.invstd[c], p.count);
      gz[j] = mean_dy_xhat_invstd<A>(sum_gz, k2.invstd[c], p.count);
    }
    for_group_chunks(p, c0, c1, [&](int64_t o, int64_t n, int64_t c, int64_t, int64_t) {
      const int64_t j = c - c0;
      dual_grad_input_span<kMask, kStream>(
          g + o, mk.at(o), x + o, z + o, dx + o, dz + o, n, B(k1.mean[c]),
          B(k1.scale[c]), B(g_mean[j]), B(gx[j]), B(k2.mean[c]), B(k2.scale[c]), B(g_mean[j]),
          B(gz[j]));
    });
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> batch_norm_dual_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const c10::optional<Tensor>& weight,
    const Tensor& input2, const c10::optional<Tensor>& weight2,
    const c10::optional<Tensor>& output, const Tensor& mean, const Tensor& invstd,
    const Tensor& mean2, const Tensor& invstd2, bool training, bool relu,
    const c10::optional<Tensor>& relu_mask) {
  const char* op = "fastnn.batch_norm_dual_backward";
  check_grad_args(op, grad_output, input, weight, output, mean, invstd, relu);
  check_same_shape(op, "input2", input, input2);
  check_channel_tensor(op, "weight2", input, weight2);
  check_stat_tensor(op, "mean2", input, mean2);
  check_stat_tensor(op, "invstd2", input, invstd2);
  const uint8_t* bits = relu ? checked_relu_mask(op, relu_mask, input) : nullptr;
  const GradTensors in(grad_output, input, output, relu);
  const int64_t C = in.shape.C;
  const auto stat_options = input.options().dtype(accumulate_type(input.scalar_type()));
  Tensor grad_input = in.empty_like_input();
  Tensor grad_input2 = in.empty_like_input();
  Tensor grad_weight = at::zeros({C}, stat_options);
  Tensor grad_bias = at::zeros({C}, stat_options);
  Tensor grad_weight2 = at::zeros({C}, stat_options);
  if (input.numel() == 0) {
    return {grad_input, grad_weight, grad_bias, grad_input2, grad_weight2, grad_bias.clone()};
  }
  const Tensor z = input2.contiguous(in.shape.format);
  FASTNN_DISPATCH_INPUT(input.scalar_type(), "fastnn.batch_norm_dual_backward (CPU)", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const Plan p = blocks_plan<T>(in.shape);
    const bool stream = use_stream<T>(p, {&grad_input, &grad_input2});
    const GradChannels<A> k1(mean, invstd, weight, C), k2(mean2, invstd2, weight2, C);
    const T* gp = in.g.const_data_ptr<T>();
    const T* xp = in.x.const_data_ptr<T>();
    const T* zp = z.const_data_ptr<T>();
    T* dxp = grad_input.mutable_data_ptr<T>();
    T* dzp = grad_input2.mutable_data_ptr<T>();
    A* gw = grad_weight.mutable_data_ptr<A>();
    A* gb = grad_bias.mutable_data_ptr<A>();
    A* gw2 = grad_weight2.mutable_data_ptr<A>();
    // The channel-local passes' first pass touches g, x, z and the output (relu, unless its
    // ReLU mask is read).
    const int64_t G =
        training ? local_channels<T>(p, 3 + int64_t(relu && bits == nullptr), stream ? 0 : 2)
                 : 0;
    if (G > 0) {
      FASTNN_BOOL_SWITCH(relu, kMask, [&] {
        FASTNN_BOOL_SWITCH(stream, kStream, [&] {
          with_mask_in<kMask, T>(in, bits, [&](const auto& mk) {
            dual_backward_local<kMask, kStream>(p, G, gp, mk, xp, zp, dxp, dzp, k1, k2, gw, gb,
                                                gw2);
          });
        });
      });
      return;
    }
    std::vector<double> sum_g(C), sum_gx(C), sum_gz(C);
    FASTNN_BOOL_SWITCH(relu, kMask, [&] {
      FASTNN_BOOL_SWITCH(!training, kGradInput, [&] {
        FASTNN_BOOL_SWITCH(stream, kStream, [&] {
          with_mask_in<kMask, T>(in, bits, [&](const auto& mk) {
            dual_grad_sums<kMask, kGradInput, kStream>(
                p, gp, mk, xp, zp, dxp, dzp, k1.mean.data(), k2.mean.data(), k1.scale.data(),
                k2.scale.data(), sum_g.data(), sum_gx.data(), sum_gz.data());
          });
        });
      });
    });
    for (int64_t c = 0; c < C; ++c) {
      gb[c] = A(sum_g[c]);
      gw[c] = weight_grad(sum_gx[c], k1.invstd[c]);
      gw2[c] = weight_grad(sum_gz[c], k2.invstd[c]);
    }
    if (!training) return;
    const std::vector<A> g_mean = mean_dy<A>(sum_g, p.count);  // both see the same g
    const std::vector<A> gx = mean_dy_xhat_invstd<A>(sum_gx, k1.invstd, p.count);
    const std::vector<A> gz = mean_dy_xhat_invstd<A>(sum_gz, k2.invstd, p.count);
    const std::vector<const A*> coef = {k1.mean.data(), k1.scale.data(), g_mean.data(), gx.data(),
                                        k2.mean.data(), k2.scale.data(), g_mean.data(), gz.data()};
    FASTNN_BOOL_SWITCH(relu, kMask, [&] {
      FASTNN_BOOL_SWITCH(stream, kStream, [&] {
        with_mask_in<kMask, T>(in, bits, [&](const auto& mk) {
          dual_input_grad<kMask, kStream, T>(p, gp, mk, xp, zp, dxp, dzp, coef);
        });
      });
    });
  });
  // Both batch norms see the same output gradient: the same bias gradient.
  return {grad_input, grad_weight, grad_bias, grad_input2, grad_weight2, grad_bias.clone()};
}

std::tuple<Tensor, Tensor> batch_norm_stats_cpu(const Tensor& input) {
  check_input("fastnn.batch_norm_stats", input);
  const BNShape shape = bn_shape(input);
  const auto stat_options = input.options().dtype(accumulate_type(input.scalar_type()));
  Tensor mean = at::zeros({shape.C}, stat_options);
  Tensor var = at::zeros({shape.C}, stat_options);
  if (input.numel() == 0) return {mean, var};
  const Tensor x = input.contiguous(shape.format);
  FASTNN_DISPATCH_INPUT(input.scalar_type(), "fastnn.batch_norm_stats (CPU)", [&] {
    using A = acc_t<scalar_t>;
    const Plan p = make_plan<scalar_t>(shape);
    std::vector<double> m(shape.C), v(shape.C);
    batch_stats<scalar_t>(p, x.const_data_ptr<scalar_t>(), m.data(), v.data());
    A* mp = mean.mutable_data_ptr<A>();
    A* vp = var.mutable_data_ptr<A>();
    for (int64_t c = 0; c < shape.C; ++c) {
      mp[c] = A(m[c]);
      vp[c] = A(v[c]);
    }
  });
  return {mean, var};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_reduce_cpu(
    const Tensor& grad_output, const Tensor& input, const c10::optional<Tensor>& output,
    const Tensor& mean, const Tensor& invstd, bool relu, bool residual_grad) {
  check_grad_args("fastnn.batch_norm_backward_reduce", grad_output, input, c10::nullopt, output,
                  mean, invstd, relu);
  const GradTensors in(grad_output, input, output, relu);
  const int64_t C = in.shape.C;
  const auto stat_options = input.options().dtype(accumulate_type(input.scalar_type()));
  Tensor sum_dy = at::zeros({C}, stat_options);
  Tensor sum_dy_xhat = at::zeros({C}, stat_options);
  Tensor grad_residual =
      residual_grad ? in.empty_like_input() : at::empty({0}, input.options());
  if (input.numel() == 0) return {sum_dy, sum_dy_xhat, grad_residual};
  FASTNN_DISPATCH_INPUT(input.scalar_type(), "fastnn.batch_norm_backward_reduce (CPU)", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const Plan p = blocks_plan<T>(in.shape);
    // Only the sums: the factor of d(input) (here invstd, no weight given) goes unused.
    const GradChannels<A> k(mean, invstd, c10::nullopt, C);
    std::vector<double> sum_g(C), sum_gx(C);
    T* grp = residual_grad ? grad_residual.mutable_data_ptr<T>() : nullptr;
    FASTNN_BOOL_SWITCH(relu, kMask, [&] {
      FASTNN_BOOL_SWITCH(residual_grad, kGradResidual, [&] {
        FASTNN_BOOL_SWITCH(use_stream<T>(p, {&grad_residual}), kStream, [&] {
          grad_sums<kMask, kGradResidual, false, kStream, T>(
              p, in.g.const_data_ptr<T>(), OutputMask<T>{in.out_ptr<T>()}, in.x.const_data_ptr<T>(), grp,
              nullptr, k.mean.data(), k.scale.data(), sum_g.data(), sum_gx.data());
        });
      });
    });
    A* sd = sum_dy.mutable_data_ptr<A>();
    A* sdx = sum_dy_xhat.mutable_data_ptr<A>();
    for (int64_t c = 0; c < C; ++c) {
      sd[c] = A(sum_g[c]);
      sdx[c] = A(sum_gx[c] * double(k.invstd[c]));
    }
  });
  return {sum_dy, sum_dy_xhat, grad_residual};
}

Tensor batch_norm_backward_elemt_cpu(const Tensor& grad_output, const Tensor& input,
                                     const c10::optional<Tensor>& weight,
                                     const c10::optional<Tensor>& output, const Tensor& mean,
                                     const Tensor& invstd, const Tensor& mean_dy,
                                     const Tensor& mean_dy_xhat, bool relu) {
  const char* op = "fastnn.batch_norm_backward_elemt";
  check_grad_args(op, grad_output, input, weight, output, mean, invstd, relu);
  check_stat_tensor(op, "mean_dy", input, mean_dy);
  check_stat_tensor(op, "mean_dy_xhat", input, mean_dy_xhat);
  const GradTensors in(grad_output, input, output, relu);
  const int64_t C = in.shape.C;
  Tensor grad_input = in.empty_like_input();
  if (input.numel() == 0) return grad_input;
  FASTNN_DISPATCH_INPUT(input.scalar_type(), "fastnn.batch_norm_backward_elemt (CPU)", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const Plan p = blocks_plan<T>(in.shape);
    const GradChannels<A> k(mean, invstd, weight, C);
    const std::vector<A> k1 = channel_values<A>(mean_dy, C, A(0));
    std::vector<A> k2 = channel_values<A>(mean_dy_xhat, C, A(0));
    // (x - mean) * invstd * mean_dy_xhat = (x - mean) * k2
    for (int64_t c = 0; c < C; ++c) k2[c] *= k.invstd[c];
    FASTNN_BOOL_SWITCH(relu, kMask, [&] {
      FASTNN_BOOL_SWITCH(use_stream<T>(p, {&grad_input}), kStream, [&] {
        input_grad<kMask, kStream, T>(p, in.g.const_data_ptr<T>(), OutputMask<T>{in.out_ptr<T>()},
                                      in.x.const_data_ptr<T>(), grad_input.mutable_data_ptr<T>(),
                                      k.mean.data(), k.scale.data(), k1.data(), k2.data());
      });
    });
  });
  return grad_input;
}

}  // namespace

// This build's entry points, for batch_norm_cpu.cpp (fastnn._C) or fastnn._C_avx512's module.
#if defined(FASTNN_CPU_BF16_NATIVE)
const KernelTable* kernels_bfloat16_avx512bf16() {
#else
template <>
const KernelTable* kernels<at::ScalarType::FASTNN_CPU_DTYPE>() {
#endif
  static const KernelTable table{
      &batch_norm_train_cpu,          &batch_norm_train_masked_cpu,
      &batch_norm_eval_cpu,           &batch_norm_backward_cpu,
      &batch_norm_stats_cpu,          &batch_norm_dual_cpu,
      &batch_norm_dual_masked_cpu,    &batch_norm_dual_backward_cpu,
      &batch_norm_train_with_stats_cpu, &batch_norm_backward_reduce_cpu,
      &batch_norm_backward_elemt_cpu, &batch_norm_cat_with_stats_cpu};
  return &table;
}

}  // namespace cpu
}  // namespace fastnn
