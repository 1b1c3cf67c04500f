// Vector building blocks of the CPU batch-norm kernels: loading and storing a "unit" of elements
// as two accumulation-type vectors, and per-channel parameters seen as vectors.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__)
#include <immintrin.h>
#define FASTNN_STREAM_STORES 512
#elif defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
#include <immintrin.h>
#define FASTNN_STREAM_STORES 256
#else
#define FASTNN_STREAM_STORES 0
#endif

namespace fastnn {
namespace cpu {

using at::vec::Vectorized;

// c - a * b in one fused multiply-add: torch's vector library has fnmadd from 2.9; before, fmadd of
// -a (negation is exact, so the result is the same).
template <typename V>
C10_ALWAYS_INLINE V vec_fnmadd(const V& a, const V& b, const V& c) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  return at::vec::fnmadd(a, b, c);
#else
  return at::vec::fmadd(a.neg(), b, c);
#endif
}

// Accumulation type: float for float32/float16/bfloat16, double for float64.
template <typename T>
using acc_t = at::opmath_type<T>;

// A unit is two accumulation vectors' worth of T: 16 floats (or halves, or bfloat16s) or 8
// doubles with AVX2. Reduced types are loaded once as one Vectorized<T> and widened to float.
template <typename T>
struct Unit {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  static constexpr int64_t kHalf = V::size();
  static constexpr int64_t kSize = 2 * V::size();

  static C10_ALWAYS_INLINE void load(const T* p, V& lo, V& hi) {
    if constexpr (std::is_same_v<T, A>) {
      lo = V::loadu(p);
      hi = V::loadu(p + kHalf);
    } else {
      static_assert(Vectorized<T>::size() == kSize, "a reduced-type vector must widen to two");
      auto wide = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
      lo = std::get<0>(wide);
      hi = std::get<1>(wide);
    }
  }

  static C10_ALWAYS_INLINE void store(T* p, const V& lo, const V& hi) {
    if constexpr (std::is_same_v<T, A>) {
      lo.store(p);
      hi.store(p + kHalf);
    } else {
      narrow(lo, hi).store(p);
    }
  }

  // lo and hi rounded to T (reduced types), as ATen's convert_from_float. Built for AVX512-BF16
  // (FASTNN_CPU_BF16_NATIVE), bfloat16 takes one vcvtne2ps2bf16, which rounds to nearest even as
  // ATen does but reads denormals as zero and gives NaN other bits: a unit holding either takes
  // ATen's sequence, so the bits are the same on every path.
  static C10_ALWAYS_INLINE Vectorized<T> narrow(const V& lo, const V& hi) {
#if defined(FASTNN_CPU_BF16_NATIVE)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      // fpclass: 0x01 quiet NaN, 0x80 signalling NaN, 0x20 denormal.
      constexpr int kOdd = 0x01 | 0x80 | 0x20;
      if (C10_LIKELY((_mm512_fpclass_ps_mask(lo, kOdd) | _mm512_fpclass_ps_mask(hi, kOdd)) == 0))
        return Vectorized<T>(reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    }
#endif
    return at::vec::convert_from_float<T>(lo, hi);
  }

  // A unit as two vectors holding its values in some order: for sums over a whole run, where
  // the order does not matter. bfloat16 is the upper half of a float: the even elements shifted
  // up and the odd ones masked are exact floats, two single-cycle operations in place of
  // widening each half with a cross-lane shuffle.
  static C10_ALWAYS_INLINE void load_any_order(const T* p, V& lo, V& hi) {
#if FASTNN_STREAM_STORES == 512
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m512i v = _mm512_loadu_si512(p);
      lo = V(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
      hi = V(_mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int32_t(0xFFFF0000u)))));
      return;
    }
#elif FASTNN_STREAM_STORES == 256
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      lo = V(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
      hi = V(_mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int32_t(0xFFFF0000u)))));
      return;
    }
#endif
    load(p, lo, hi);
  }

  // The first `count` (< kSize) elements of a unit at p, in load's order, zeros after them; reads
  // nothing past p + count.
  static C10_ALWAYS_INLINE void load_partial(const T* p, int64_t count, V& lo, V& hi) {
    if constexpr (std::is_same_v<T, A>) {
      lo = V::loadu(p, std::min(count, kHalf));
      hi = count > kHalf ? V::loadu(p + kHalf, count - kHalf) : V(A(0));
    } else {
      auto wide = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, count));
      lo = std::get<0>(wide);
      hi = std::get<1>(wide);
    }
  }

  // The first `count` (< kSize) elements of lo and hi (in load's order) to p; writes nothing past
  // p + count.
  static C10_ALWAYS_INLINE void store_partial(T* p, int64_t count, const V& lo, const V& hi) {
    if constexpr (std::is_same_v<T, A>) {
      lo.store(p, std::min(count, kHalf));
      if (count > kHalf) hi.store(p + kHalf, count - kHalf);
    } else {
      narrow(lo, hi).store(p, int(count));
    }
  }

  // Zeros in the lanes of lo and hi past the first `count` (< kSize) of the unit.
  static C10_ALWAYS_INLINE void keep_first(int64_t count, V& lo, V& hi) {
    lo = V::set(V(A(0)), lo, std::min(count, kHalf));
    hi = V::set(V(A(0)), hi, std::max<int64_t>(0, count - kHalf));
  }

  // A whole unit, or with kPartial its first `count` elements: for a loop body written once for
  // both the units of a run and its last, shorter one (put_n stores alike).
  template <bool kPartial>
  static C10_ALWAYS_INLINE void load_n(const T* p, int64_t count, V& lo, V& hi) {
    if constexpr (kPartial) {
      load_partial(p, count, lo, hi);
    } else {
      load(p, lo, hi);
    }
  }

  // Non-temporal store of a unit to an address aligned to a vector register (kStreamAlign): the
  // line is not read first and does not push other data out of the cache. Falls back to store()
  // without AVX2.
  static constexpr int64_t kStreamAlign = int64_t(sizeof(V));
  static C10_ALWAYS_INLINE void stream(T* p, const V& lo, const V& hi) {
#if FASTNN_STREAM_STORES == 512
    if constexpr (std::is_same_v<T, float>) {
      _mm512_stream_ps(p, lo);
      _mm512_stream_ps(p + kHalf, hi);
    } else if constexpr (std::is_same_v<T, double>) {
      _mm512_stream_pd(p, lo);
      _mm512_stream_pd(p + kHalf, hi);
    } else {
      stream_narrowed(p, narrow(lo, hi));
    }
#elif FASTNN_STREAM_STORES == 256
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(p, lo);
      _mm256_stream_ps(p + kHalf, hi);
    } else if constexpr (std::is_same_v<T, double>) {
      _mm256_stream_pd(p, lo);
      _mm256_stream_pd(p + kHalf, hi);
    } else {
      stream_narrowed(p, narrow(lo, hi));
    }
#else
    store(p, lo, hi);
#endif
  }

  // Non-temporal store of a unit already rounded to a reduced T (narrow), as stream's.
  static C10_ALWAYS_INLINE void stream_narrowed(T* p, const Vectorized<T>& t) {
#if FASTNN_STREAM_STORES == 512
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), t);
#elif FASTNN_STREAM_STORES == 256
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), t);
#else
    t.store(p);
#endif
  }
};

// Orders this thread's non-temporal stores before whatever follows (the end of a parallel region).
inline void stream_fence() {
#if FASTNN_STREAM_STORES
  _mm_sfence();
#endif
}


// Sum of a vector's lanes, as a tree of shuffles (ATen's reduction) rather than one dependent
// add per lane.
template <typename A>
C10_ALWAYS_INLINE A horizontal_sum(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>(
      [](const Vectorized<A>& a, const Vectorized<A>& b) { return a + b; }, v);
}

// The lane sums of two vectors together: each shuffle of the tree serves both.
template <typename A>
C10_ALWAYS_INLINE void horizontal_sums(const Vectorized<A>& a, const Vectorized<A>& b, A& sum_a,
                                       A& sum_b) {
#if FASTNN_STREAM_STORES == 512
  if constexpr (std::is_same_v<A, float>) {
    // 128-bit blocks: [a0+a2, a1+a3, b0+b2, b1+b3], then [A, A, B, B], then within each block.
    const __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 u = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, _MM_SHUFFLE(2, 3, 0, 1)));
    u = _mm512_add_ps(u, _mm512_permute_ps(u, _MM_SHUFFLE(1, 0, 3, 2)));
    u = _mm512_add_ps(u, _mm512_permute_ps(u, _MM_SHUFFLE(2, 3, 0, 1)));
    sum_a = _mm512_cvtss_f32(u);
    sum_b = _mm_cvtss_f32(_mm512_extractf32x4_ps(u, 2));
    return;
  }
#elif FASTNN_STREAM_STORES == 256
  if constexpr (std::is_same_v<A, float>) {
    // 128-bit halves: [a0+a1, b0+b1], then within each.
    __m256 u =
        _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    u = _mm256_add_ps(u, _mm256_permute_ps(u, _MM_SHUFFLE(1, 0, 3, 2)));
    u = _mm256_add_ps(u, _mm256_permute_ps(u, _MM_SHUFFLE(2, 3, 0, 1)));
    sum_a = _mm256_cvtss_f32(u);
    sum_b = _mm_cvtss_f32(_mm256_extractf128_ps(u, 1));
    return;
  }
#endif
  sum_a = horizontal_sum(a);
  sum_b = horizontal_sum(b);
}

// ReLU that keeps NaN, like torch.relu.
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> relu(const Vectorized<A>& v) {
  return at::vec::maximum(v, Vectorized<A>(A(0)));
}
template <typename A>
C10_ALWAYS_INLINE A relu(A v) {
  return std::isnan(v) ? v : (v > A(0) ? v : A(0));
}

// g, except 0 where out <= 0: the ReLU's backward as torch computes it (threshold_backward), which
// passes the gradient where the output is NaN.
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> mask_positive(const Vectorized<A>& g, const Vectorized<A>& out) {
  return Vectorized<A>::blendv(g, Vectorized<A>(A(0)), out <= Vectorized<A>(A(0)));
}

// ---------------------------------------------------------------------------------------------
// The ReLU mask a training forward writes for its backward: a bit per element of the output, in
// the output's memory order (element i: bit i % 8 of byte i / 8), set where the output is > 0 or
// NaN, i.e. where the backward passes the gradient (torch's threshold_backward). relu_mask_bytes
// adds 8 bytes past the last bit so that a unit's bits are read as one 8-byte word from any
// element's byte.

inline int64_t relu_mask_bytes(int64_t numel) { return numel == 0 ? 0 : (numel + 7) / 8 + 8; }

// The low `count` bits set (count <= 32).
C10_ALWAYS_INLINE uint32_t low_bits(int64_t count) {
  return count >= 32 ? ~uint32_t(0) : (uint32_t(1) << count) - 1;
}

// Bits of a unit's lanes (lo's, then hi's) where !(v <= 0): set for v > 0 and for NaN. For
// float and double, whose outputs are stored as computed.
template <typename A>
C10_ALWAYS_INLINE uint32_t positive_bits(const Vectorized<A>& lo, const Vectorized<A>& hi) {
  constexpr int kHalf = int(Vectorized<A>::size());
#if FASTNN_STREAM_STORES == 512
  if constexpr (std::is_same_v<A, float>) {
    const __m512 zero = _mm512_setzero_ps();
    return uint32_t(_mm512_cmp_ps_mask(lo, zero, _CMP_NLE_UQ)) |
           (uint32_t(_mm512_cmp_ps_mask(hi, zero, _CMP_NLE_UQ)) << kHalf);
  } else if constexpr (std::is_same_v<A, double>) {
    const __m512d zero = _mm512_setzero_pd();
    return uint32_t(_mm512_cmp_pd_mask(lo, zero, _CMP_NLE_UQ)) |
           (uint32_t(_mm512_cmp_pd_mask(hi, zero, _CMP_NLE_UQ)) << kHalf);
  }
#elif FASTNN_STREAM_STORES == 256
  if constexpr (std::is_same_v<A, float>) {
    const __m256 zero = _mm256_setzero_ps();
    return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(lo, zero, _CMP_NLE_UQ))) |
           (uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(hi, zero, _CMP_NLE_UQ))) << kHalf);
  } else if constexpr (std::is_same_v<A, double>) {
    const __m256d zero = _mm256_setzero_pd();
    return uint32_t(_mm256_movemask_pd(_mm256_cmp_pd(lo, zero, _CMP_NLE_UQ))) |
           (uint32_t(_mm256_movemask_pd(_mm256_cmp_pd(hi, zero, _CMP_NLE_UQ))) << kHalf);
  }
#endif
  A l[kHalf], h[kHalf];
  lo.store(l);
  hi.store(h);
  uint32_t bits = 0;
  for (int i = 0; i < kHalf; ++i) {
    bits |= uint32_t(!(l[i] <= A(0))) << i;
    bits |= uint32_t(!(h[i] <= A(0))) << (i + kHalf);
  }
  return bits;
}

// Bits of the lanes of a ReLU's output rounded to a 16-bit type (bfloat16, float16) whose
// magnitude is not zero: after a ReLU those are exactly the values > 0 and the NaNs. Taken from
// the rounded values, so that a positive float that rounds to zero gets the backward of a zero
// output, as torch's.
template <typename T>
C10_ALWAYS_INLINE uint32_t nonzero_bits(const Vectorized<T>& t) {
  static_assert(sizeof(T) == 2, "16-bit lanes");
#if FASTNN_STREAM_STORES == 512
  return uint32_t(_mm512_test_epi16_mask(t, _mm512_set1_epi16(0x7FFF)));
#elif FASTNN_STREAM_STORES == 256
  const __m256i zero = _mm256_cmpeq_epi16(_mm256_and_si256(t, _mm256_set1_epi16(0x7FFF)),
                                          _mm256_setzero_si256());
  const __m128i bytes =
      _mm_packs_epi16(_mm256_castsi256_si128(zero), _mm256_extracti128_si256(zero, 1));
  return ~uint32_t(_mm_movemask_epi8(bytes)) & 0xFFFFu;
#else
  constexpr int kLanes = int(Vectorized<T>::size());
  T v[kLanes];
  t.store(v);
  uint32_t bits = 0;
  for (int i = 0; i < kLanes; ++i) {
    uint16_t raw;
    std::memcpy(&raw, &v[i], 2);
    bits |= uint32_t((raw & 0x7FFF) != 0) << i;
  }
  return bits;
#endif
}

// g with +0 in the lanes whose bit is clear (bit i: lane i).
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> keep_lanes(const Vectorized<A>& g, uint32_t bits) {
  constexpr int kLanes = int(Vectorized<A>::size());
#if FASTNN_STREAM_STORES == 512
  if constexpr (std::is_same_v<A, float>) {
    return _mm512_maskz_mov_ps(__mmask16(bits), g);
  } else if constexpr (std::is_same_v<A, double>) {
    return _mm512_maskz_mov_pd(__mmask8(bits), g);
  }
#elif FASTNN_STREAM_STORES == 256
  if constexpr (std::is_same_v<A, float>) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i on =
        _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(bits)), sel), sel);
    return _mm256_and_ps(g, _mm256_castsi256_ps(on));
  } else if constexpr (std::is_same_v<A, double>) {
    const __m256i sel = _mm256_setr_epi64x(1, 2, 4, 8);
    const __m256i on =
        _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(int64_t(bits)), sel), sel);
    return _mm256_and_pd(g, _mm256_castsi256_pd(on));
  }
#endif
  A v[kLanes];
  g.store(v);
  for (int i = 0; i < kLanes; ++i) {
    if (((bits >> i) & 1u) == 0) v[i] = A(0);
  }
  return Vectorized<A>::loadu(v);
}

// The mask's bits from bit `at` on (at least 57 of them): bit j is element at + j's.
C10_ALWAYS_INLINE uint64_t mask_bits_at(const uint8_t* bits, int64_t at) {
  uint64_t w;
  std::memcpy(&w, bits + (at >> 3), sizeof(w));
  return w >> (at & 7);
}

// Writes the mask's bits of the runs one thread normalizes, in order: seek(run's first bit), then
// put() its bits. A run that starts where the last one ended (the next chunk or plane, in memory
// order) continues in the bits held back; whole bytes are stored as they fill. A byte shared with
// a run another thread may write, at the start and end of each break in the sequence, takes only
// this writer's bits, with atomic and/or on the byte; planes that end inside a byte (14x14: 196
// bits) so cost no locked instruction each. finish() writes what is held back.
class alignas(64) MaskBitWriter {  // a cache line each: one per thread, side by side
 public:
  explicit MaskBitWriter(uint8_t* bits = nullptr) : bits_(bits) {}

  C10_ALWAYS_INLINE void seek(int64_t pos) {
    if (C10_UNLIKELY(pos != next_)) start(pos);
  }

  // Appends the low k (<= 32) bits of b (whose other bits are clear).
  C10_ALWAYS_INLINE void put(uint32_t b, int k) {
    pending_ |= uint64_t(b) << n_;
    n_ += k;
    next_ += k;
    if (n_ >= 32) flush_word();
  }

  void finish() {
    for (int i = 0; n_ > 0; ++i, n_ -= 8) {
      uint8_t own = n_ >= 8 ? uint8_t(0xFF) : uint8_t((1u << n_) - 1);
      if (i == 0) own &= uint8_t(0xFF << lead_);
      store_byte(byte_ + i, uint8_t(pending_ >> (8 * i)), own);
    }
    n_ = 0;
    lead_ = 0;
    pending_ = 0;
    next_ = -1;
  }

 private:
  void start(int64_t pos) {
    finish();
    byte_ = bits_ + (pos >> 3);
    lead_ = n_ = int(pos & 7);
    next_ = pos;
  }

  C10_ALWAYS_INLINE void flush_word() {
    const uint32_t w = uint32_t(pending_);
    if (C10_UNLIKELY(lead_ != 0)) {
      store_byte(byte_, uint8_t(w), uint8_t(0xFF << lead_));
      std::memcpy(byte_ + 1, reinterpret_cast<const uint8_t*>(&w) + 1, 3);
      lead_ = 0;
    } else {
      std::memcpy(byte_, &w, sizeof(w));
    }
    byte_ += 4;
    pending_ >>= 32;
    n_ -= 32;
  }

  static void store_byte(uint8_t* p, uint8_t value, uint8_t own) {
    if (own == 0xFF) {
      *p = value;
    } else if (own != 0) {
      __atomic_fetch_and(p, uint8_t(~own), __ATOMIC_RELAXED);
      __atomic_fetch_or(p, uint8_t(value & own), __ATOMIC_RELAXED);
    }
  }

  uint8_t* bits_;
  uint8_t* byte_ = nullptr;
  int64_t next_ = -1;  // the bit after the last one put; -1 when none is held back
  uint64_t pending_ = 0;
  int lead_ = 0;       // bits of the first byte before this writer's (another run's)
  int n_ = 0;          // bits in pending_, lead_ included until the first word is stored
};
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the mask's words are stored as bytes");

// A per-channel parameter as the kernels see it: one value for a whole channels-first block
// (Broadcast) or one value per column of a channels-last row (PerColumn).
template <typename A>
struct Broadcast {
  Vectorized<A> v;
  A s;
  explicit Broadcast(A value) : v(value), s(value) {}
  C10_ALWAYS_INLINE Vectorized<A> vec(int64_t) const { return v; }
  C10_ALWAYS_INLINE A scalar(int64_t) const { return s; }
};

template <typename A>
struct PerColumn {
  const A* p;
  explicit PerColumn(const A* ptr) : p(ptr) {}
  C10_ALWAYS_INLINE Vectorized<A> vec(int64_t j) const { return Vectorized<A>::loadu(p + j); }
  C10_ALWAYS_INLINE A scalar(int64_t j) const { return p[j]; }
};

// Asks for the cache line `ahead` elements past `p` before its use. The address is formed as an
// integer: the line may lie past the end of the tensor (a prefetch neither faults nor changes
// any result, only wastes a fetch).
template <typename T>
C10_ALWAYS_INLINE void prefetch(const T* p, int64_t ahead) {
#if defined(__GNUC__) || defined(__clang__)
  const uintptr_t at = reinterpret_cast<uintptr_t>(p) + uintptr_t(ahead * int64_t(sizeof(T)));
  __builtin_prefetch(reinterpret_cast<const void*>(at), 0, 3);
#else
  (void)p;
  (void)ahead;
#endif
}

// Asks for every cache line of the n elements that start `ahead` elements past p (prefetch's,
// one per line and the last element's).
template <typename T>
C10_ALWAYS_INLINE void prefetch_run(const T* p, int64_t ahead, int64_t n) {
  constexpr int64_t kLine = std::max<int64_t>(1, 64 / int64_t(sizeof(T)));
  for (int64_t i = 0; i < n; i += kLine) prefetch(p, ahead + i);
  if (n > 0) prefetch(p, ahead + n - 1);
}

// A parameter known to be zero everywhere: the kernels skip its loads and arithmetic.
struct Zero {};


}  // namespace cpu
}  // namespace fastnn
