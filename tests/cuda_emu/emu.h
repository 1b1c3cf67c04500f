// A CPU emulation of the CUDA runtime surface fastnn's kernels use, so that csrc/cuda's device
// and host code runs, unmodified apart from the launch syntax, on CPU tensors (see
// tests/cuda_emu/emu_build.py and tests/test_cuda_emulated.py).
//
// Each block runs as one fiber (ucontext) per CUDA thread on the calling OS thread. A fiber runs
// until it reaches __syncthreads() or a warp shuffle, so code between two barriers runs for one
// thread at a time, in an order the test chooses (threads ascending, descending, or shuffled):
// a result that depends on that order is a missing barrier. Faults the hardware would report or
// leave undefined are errors here:
//   * a launch configuration CUDA rejects (empty or too large block or grid, a block over the
//     kernel's __launch_bounds__);
//   * __syncthreads() not reached by every thread of the block (a thread exits or waits elsewhere);
//   * a shuffle whose mask is not the whole warp, or a warp that is not full;
//   * a grid_sync() outside a cooperative launch, or not reached by every thread of the grid;
//   * a cooperative launch of more blocks than the occupancy query allows to be resident, or
//     with more dynamic shared memory than the device's opt-in limit;
// Shared memory starts every block filled with 0xFF bytes (NaN for floating-point types), so a read
// of shared memory no thread wrote shows up in the results. A cooperative launch
// (cudaLaunchCooperativeKernel) runs all its blocks together: each block's threads run until
// every one of them waits at grid_sync(), then the next block's, and all continue once the whole
// grid has arrived. Its blocks have their own dynamic shared memory; static __shared__ arrays
// (one per kernel here, not one per block) are refused there.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define FASTNN_EMU_ASAN 1
#endif

// ---------------------------------------------------------------------------------------------
// Types and qualifiers of the CUDA language.

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using std::isfinite;
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

namespace fastnn_emu {

// ---------------------------------------------------------------------------------------------
// Settings the tests change.

struct Settings {
  int sm_count = 4;          // multiprocessors the launch planning sees
  int blocks_per_sm = 2;     // what the occupancy query answers
  int schedule = 0;          // 0: threads ascending, 1: descending, 2: shuffled with `seed`
  uint64_t seed = 0;
  int64_t smem_optin = 227 << 10;  // dynamic shared memory a block may have (opt-in limit)
  int64_t launches = 0;      // kernels launched so far
  int64_t blocks = 0;        // blocks run so far
};

inline Settings& settings() {
  static Settings s;
  return s;
}

// ---------------------------------------------------------------------------------------------
// One block in flight: its fibers and barriers.

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int linear = 0;
  bool done = false;
  // What the fiber waits for: 0 nothing, 1 the block barrier, 2 its warp's barrier; and the
  // generation of that barrier when it started waiting.
  int waiting = 0;
  uint64_t wait_gen = 0;
};

// The grid barrier of a cooperative launch.
struct Grid {
  uint64_t gen = 0;
  int64_t arrived = 0;
  int64_t threads = 0;
};

struct Block {
  uint3 idx;
  dim3 dim;
  dim3 grid;
  int nthreads = 0;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  ucontext_t sched;
  const std::function<void()>* body = nullptr;
  int bar_arrived = 0;
  uint64_t bar_gen = 0;
  std::vector<int> warp_arrived;
  std::vector<uint64_t> warp_gen;
  std::vector<uint64_t> slots;  // [warp][32] shuffle exchange
  uint64_t serial = 0;          // block number, for shared-memory poisoning
  std::exception_ptr error;     // a check that failed in device code
  Grid* grid_state = nullptr;   // set in a cooperative launch
  int grid_waiting = 0;         // threads waiting at grid_sync()
  bool finished = false;
  std::vector<unsigned char> dynamic;  // dynamic shared memory
  std::vector<int> order;
#if FASTNN_EMU_ASAN
  void* fake_stack = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
#endif
};

inline Block*& current_block() {
  static thread_local Block* b = nullptr;
  return b;
}

inline Block& block() {
  Block* b = current_block();
  TORCH_CHECK(b != nullptr && b->current != nullptr,
              "cuda_emu: device code called outside a kernel launch");
  return *b;
}

// Fiber stacks, kept between launches.
constexpr size_t kStackBytes = size_t{256} << 10;

inline std::vector<std::unique_ptr<char[]>>& stacks() {
  static thread_local std::vector<std::unique_ptr<char[]>> s;
  return s;
}

// Switch from the running fiber back to the scheduler.
inline void yield_to_scheduler(Block& b) {
  Fiber* f = b.current;
#if FASTNN_EMU_ASAN
  __sanitizer_start_switch_fiber(&b.fake_stack, b.sched_stack_bottom, b.sched_stack_size);
#endif
  swapcontext(&f->ctx, &b.sched);
#if FASTNN_EMU_ASAN
  __sanitizer_finish_switch_fiber(b.fake_stack, nullptr, nullptr);
#endif
}

inline void fiber_entry() {
  Block& b = *current_block();
#if FASTNN_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.sched_stack_bottom, &b.sched_stack_size);
#endif
  // An exception cannot unwind past a fiber's first frame: it is kept and rethrown by
  // run_block on the launching thread's own stack.
  try {
    (*b.body)();
  } catch (...) {
    b.error = std::current_exception();
  }
  b.current->done = true;
#if FASTNN_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, b.sched_stack_bottom, b.sched_stack_size);
#endif
  setcontext(&b.sched);
}

// Set up the fibers of one block, on stacks()[stack_base, stack_base + nthreads).
inline void init_block(Block& b, size_t stack_base) {
  const int n = b.nthreads;
  auto& st = stacks();
  while (st.size() < stack_base + n) st.emplace_back(new char[kStackBytes]);
  b.fibers.assign(n, Fiber{});
  for (int t = 0; t < n; ++t) {
    Fiber& f = b.fibers[t];
    f.linear = t;
    f.tid = uint3{static_cast<unsigned>(t % b.dim.x),
                  static_cast<unsigned>((t / b.dim.x) % b.dim.y),
                  static_cast<unsigned>(t / (b.dim.x * b.dim.y))};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = st[stack_base + t].get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  const int warps = (n + 31) / 32;
  b.warp_arrived.assign(warps, 0);
  b.warp_gen.assign(warps, 0);
  b.slots.assign(static_cast<size_t>(warps) * 32, 0);
  b.bar_arrived = 0;
  b.bar_gen = 0;
  b.grid_waiting = 0;
  b.finished = false;
  b.error = nullptr;

  b.order.resize(n);
  std::iota(b.order.begin(), b.order.end(), 0);
  const Settings& s = settings();
  if (s.schedule == 1) {
    std::reverse(b.order.begin(), b.order.end());
  } else if (s.schedule == 2) {
    std::mt19937_64 rng(s.seed * 1000003u + b.serial);
    std::shuffle(b.order.begin(), b.order.end(), rng);
  }
}

// Run the threads of a block until all have exited (returns true) or every one still running
// waits at grid_sync() (returns false).
inline bool step_block(Block& b) {
  const int n = b.nthreads;
  current_block() = &b;
  struct Leave {
    ~Leave() { current_block() = nullptr; }
  } leave;  // also when a check below throws
  int finished = 0;
  for (const Fiber& f : b.fibers) finished += f.done ? 1 : 0;
  while (finished < n) {
    bool progressed = false;
    for (int t : b.order) {
      Fiber& f = b.fibers[t];
      if (f.done) continue;
      if (f.waiting == 1 && b.bar_gen == f.wait_gen) continue;
      if (f.waiting == 2 && b.warp_gen[f.linear / 32] == f.wait_gen) continue;
      if (f.waiting == 3 && b.grid_state->gen == f.wait_gen) continue;
      f.waiting = 0;
      b.current = &f;
#if FASTNN_EMU_ASAN
      __sanitizer_start_switch_fiber(&b.fake_stack, f.ctx.uc_stack.ss_sp, kStackBytes);
#endif
      swapcontext(&b.sched, &f.ctx);
#if FASTNN_EMU_ASAN
      __sanitizer_finish_switch_fiber(b.fake_stack, nullptr, nullptr);
#endif
      b.current = nullptr;
      progressed = true;
      if (b.error) {
        // The block's other threads are abandoned where they wait; their stacks are reused.
        std::rethrow_exception(b.error);
      }
      if (f.done) {
        ++finished;
        // A thread that exits while others wait at a barrier leaves them waiting forever.
        TORCH_CHECK(b.bar_arrived == 0,
                    "cuda_emu: a thread exited while others wait at __syncthreads() (block ",
                    b.idx.x, ",", b.idx.y, ",", b.idx.z, ", thread ", f.linear, ")");
        TORCH_CHECK(b.warp_arrived[f.linear / 32] == 0,
                    "cuda_emu: a thread exited while its warp waits at a shuffle (thread ",
                    f.linear, ")");
        TORCH_CHECK(b.grid_waiting == 0,
                    "cuda_emu: a thread exited while others wait at grid_sync() (block ", b.idx.x,
                    ",", b.idx.y, ",", b.idx.z, ", thread ", f.linear, ")");
      }
    }
    if (!progressed && finished < n && b.grid_waiting == n - finished) return false;
    TORCH_CHECK(progressed || finished == n,
                "cuda_emu: deadlock: threads wait at barriers no other thread reaches (block ",
                b.idx.x, ",", b.idx.y, ",", b.idx.z, ")");
  }
  return true;
}

// Run every thread of one block to completion (a launch that is not cooperative).
inline void run_block(Block& b) {
  init_block(b, 0);
  step_block(b);  // without a Grid, grid_sync() fails before any thread could wait there
}

// ---------------------------------------------------------------------------------------------
// Barriers and shuffles.

inline void syncthreads() {
  Block& b = block();
  const uint64_t gen = b.bar_gen;
  if (++b.bar_arrived == b.nthreads) {
    b.bar_arrived = 0;
    ++b.bar_gen;
    return;
  }
  b.current->waiting = 1;
  b.current->wait_gen = gen;
  yield_to_scheduler(b);
}

inline void warp_barrier(Block& b, int warp) {
  const uint64_t gen = b.warp_gen[warp];
  if (++b.warp_arrived[warp] == 32) {
    b.warp_arrived[warp] = 0;
    ++b.warp_gen[warp];
    return;
  }
  b.current->waiting = 2;
  b.current->wait_gen = gen;
  yield_to_scheduler(b);
}

inline void grid_sync() {
  Block& b = block();
  TORCH_CHECK(b.grid_state != nullptr,
              "cuda_emu: grid_sync() in a kernel not launched with cudaLaunchCooperativeKernel");
  Grid& g = *b.grid_state;
  ++g.arrived;
  ++b.grid_waiting;
  b.current->waiting = 3;
  b.current->wait_gen = g.gen;
  yield_to_scheduler(b);
}

template <typename T>
T* dynamic_shared() {
  Block& b = block();
  TORCH_CHECK(!b.dynamic.empty(), "cuda_emu: dynamic shared memory in a launch without any");
  return reinterpret_cast<T*>(b.dynamic.data());
}

template <typename T>
T shfl_down(unsigned mask, T v, unsigned delta, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "cuda_emu: shuffle of a type over 8 bytes");
  Block& b = block();
  TORCH_CHECK(mask == 0xffffffffu, "cuda_emu: __shfl_down_sync with a partial mask ", mask);
  TORCH_CHECK(b.nthreads % 32 == 0, "cuda_emu: shuffle in a block of ", b.nthreads,
              " threads (not whole warps)");
  TORCH_CHECK(width > 0 && width <= 32 && (width & (width - 1)) == 0,
              "cuda_emu: shuffle width ", width);
  const int lane = b.current->linear % 32;
  const int warp = b.current->linear / 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  b.slots[warp * 32 + lane] = bits;
  warp_barrier(b, warp);
  T out = v;
  if ((lane % width) + static_cast<int>(delta) < width) {
    std::memcpy(&out, &b.slots[warp * 32 + lane + delta], sizeof(T));
  }
  warp_barrier(b, warp);  // nobody overwrites a slot before every lane has read
  return out;
}

// First statement of a kernel declared with __launch_bounds__(max_threads, ...).
inline void check_launch_bounds(int64_t max_threads) {
  Block& b = block();
  TORCH_CHECK(b.nthreads <= max_threads, "cuda_emu: invalid launch: a block of ", b.nthreads,
              " threads for a kernel with __launch_bounds__(", max_threads, ")");
}

// Shared memory of the running block: filled with 0xFF once per block.
inline void shared_poison(void* p, size_t bytes) {
  static thread_local std::map<void*, uint64_t> seen;
  Block& b = block();
  TORCH_CHECK(b.grid_state == nullptr,
              "cuda_emu: a static __shared__ array in a cooperative launch (emulated as one "
              "array for all blocks); use dynamic shared memory");
  auto it = seen.find(p);
  if (it != seen.end() && it->second == b.serial) return;
  seen[p] = b.serial;
  std::memset(p, 0xFF, bytes);
}

// ---------------------------------------------------------------------------------------------
// Launch.

inline uint64_t& block_serial() {
  static thread_local uint64_t s = 0;
  return s;
}

template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid;
  dim3 blk;

  template <typename... A>
  void operator()(A&&... args) const {
    const uint64_t threads = uint64_t{blk.x} * blk.y * blk.z;
    TORCH_CHECK(threads >= 1 && threads <= 1024 && blk.z <= 64,
                "cuda_emu: invalid block (", blk.x, ",", blk.y, ",", blk.z, ")");
    TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u &&
                    grid.y <= 65535 && grid.z <= 65535,
                "cuda_emu: invalid grid (", grid.x, ",", grid.y, ",", grid.z, ")");
    // Arguments are copied into the parameters' types once, as a launch does.
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    ++settings().launches;
    Block b;
    b.dim = blk;
    b.grid = grid;
    b.nthreads = static_cast<int>(threads);
    b.body = &body;
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          b.idx = uint3{x, y, z};
          b.serial = ++block_serial();
          ++settings().blocks;
          run_block(b);
        }
      }
    }
  }
};

template <typename... P>
Launcher<P...> launch(void (*kernel)(P...), dim3 grid, dim3 blk, size_t shared = 0,
                      void* stream = nullptr) {
  (void)stream;
  TORCH_CHECK(shared == 0, "cuda_emu: dynamic shared memory is not emulated");
  return Launcher<P...>{kernel, grid, blk};
}

template <typename... P, size_t... I>
std::tuple<std::decay_t<P>...> unpack_args(void** args, std::index_sequence<I...>) {
  return std::tuple<std::decay_t<P>...>(*static_cast<std::decay_t<P>*>(args[I])...);
}

// cudaLaunchCooperativeKernel: every block resident at once (at most sm_count x blocks_per_sm),
// each with `shared` bytes of dynamic shared memory filled with 0xFF.
template <typename... P>
void launch_cooperative(void (*kernel)(P...), dim3 grid, dim3 blk, void** args, size_t shared) {
  const uint64_t threads = uint64_t{blk.x} * blk.y * blk.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && blk.z <= 64,
              "cuda_emu: invalid block (", blk.x, ",", blk.y, ",", blk.z, ")");
  const uint64_t nblocks = uint64_t{grid.x} * grid.y * grid.z;
  const Settings& s = settings();
  TORCH_CHECK(nblocks >= 1 && nblocks <= static_cast<uint64_t>(s.sm_count) * s.blocks_per_sm,
              "cuda_emu: cooperative launch of ", nblocks, " blocks, more than can be resident");
  TORCH_CHECK(static_cast<int64_t>(shared) <= s.smem_optin, "cuda_emu: ", shared,
              " bytes of dynamic shared memory, over the device's ", s.smem_optin);
  // The arguments, as cudaLaunchCooperativeKernel gets them: a pointer to each parameter.
  auto params = unpack_args<P...>(args, std::index_sequence_for<P...>());
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  ++settings().launches;
  Grid g;
  g.threads = static_cast<int64_t>(nblocks * threads);
  std::vector<Block> blocks(nblocks);
  size_t k = 0;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x, ++k) {
        Block& b = blocks[k];
        b.dim = blk;
        b.grid = grid;
        b.nthreads = static_cast<int>(threads);
        b.body = &body;
        b.idx = uint3{x, y, z};
        b.serial = ++block_serial();
        b.grid_state = &g;
        b.dynamic.assign(shared, 0xFF);
        ++settings().blocks;
        init_block(b, k * threads);
      }
    }
  }
  for (;;) {
    size_t done = 0;
    for (Block& b : blocks) {
      if (!b.finished) b.finished = step_block(b);
      done += b.finished ? 1 : 0;
    }
    if (done == blocks.size()) break;
    TORCH_CHECK(done == 0, "cuda_emu: ", done, " of ", blocks.size(),
                " blocks exited while the others wait at grid_sync()");
    TORCH_CHECK(g.arrived == g.threads, "cuda_emu: grid_sync() reached by ", g.arrived, " of ",
                g.threads, " threads");
    g.arrived = 0;
    ++g.gen;
    for (Block& b : blocks) b.grid_waiting = 0;
  }
}

}  // namespace fastnn_emu

// ---------------------------------------------------------------------------------------------
// Built-in variables and intrinsics.

#define threadIdx (::fastnn_emu::block().current->tid)
#define blockIdx (::fastnn_emu::block().idx)
#define blockDim (::fastnn_emu::block().dim)
#define gridDim (::fastnn_emu::block().grid)

inline void __syncthreads() { ::fastnn_emu::syncthreads(); }
inline void grid_sync() { ::fastnn_emu::grid_sync(); }
template <typename T>
T* dynamic_shared() {
  return ::fastnn_emu::dynamic_shared<T>();
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::fastnn_emu::shfl_down(mask, v, delta, width);
}

// ---------------------------------------------------------------------------------------------
// Runtime API and the ATen/c10 CUDA helpers the host code calls.

struct CUstream_st;
using cudaStream_t = CUstream_st*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorCooperativeLaunchTooLarge = 720;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

struct cudaDeviceProp {
  int multiProcessorCount;
  size_t sharedMemPerBlockOptin;
  int cooperativeLaunch;
};

// Blocks per multiprocessor: the tests' setting, none over the opt-in shared memory limit.
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int threads,
                                                                 size_t shared) {
  TORCH_CHECK(threads >= 1 && threads <= 1024, "cuda_emu: occupancy query for ", threads,
              " threads");
  const auto& s = ::fastnn_emu::settings();
  *n = static_cast<int64_t>(shared) <= s.smem_optin ? s.blocks_per_sm : 0;
  return cudaSuccess;
}

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

template <typename F>
cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int value) {
  TORCH_CHECK(value >= 0 && value <= ::fastnn_emu::settings().smem_optin,
              "cuda_emu: shared memory allowance ", value, " over the device's limit");
  return cudaSuccess;
}

template <typename... P>
cudaError_t cudaLaunchCooperativeKernel(void (*kernel)(P...), dim3 grid, dim3 block, void** args,
                                        size_t shared = 0, cudaStream_t = nullptr) {
  ::fastnn_emu::launch_cooperative(kernel, grid, block, args, shared);
  return cudaSuccess;
}

#define C10_CUDA_CHECK(EXPR)                                                    \
  do {                                                                          \
    const cudaError_t fastnn_emu_err = (EXPR);                                  \
    TORCH_CHECK(fastnn_emu_err == cudaSuccess, "cuda_emu: error ", fastnn_emu_err); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace at {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
inline cudaDeviceProp* getCurrentDeviceProperties() {
  static thread_local cudaDeviceProp p;
  p.multiProcessorCount = ::fastnn_emu::settings().sm_count;
  p.sharedMemPerBlockOptin = static_cast<size_t>(::fastnn_emu::settings().smem_optin);
  p.cooperativeLaunch = 1;
  return &p;
}
}  // namespace cuda
}  // namespace at

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline c10::DeviceIndex current_device() { return 0; }
}  // namespace cuda
}  // namespace c10
