// Kernels for checking the emulation itself (tests/test_cuda_emulated.py): a warp and block
// reduction written correctly, the same with its barrier left out, a barrier only some threads
// reach, launches CUDA refuses, and cooperative launches (a grid barrier, and the same with a
// thread or a block leaving before it). Built through the same translation as csrc/cuda.
#include <torch/extension.h>

#include <cuda_runtime.h>

namespace fastnn_emu_check {

// out[b] = sum of x over block b's threads; thread t of block b holds x[b * blockDim.x + t].
// With `barrier` false the final sum reads shared memory other threads may not have written.
__global__ void block_sum_kernel(const float* x, float* out, bool barrier) {
  __shared__ float sm[1024];
  const int t = threadIdx.x;
  sm[t] = x[blockIdx.x * blockDim.x + t];
  if (barrier) __syncthreads();
  if (t == 0) {
    float s = 0.f;
    for (int i = 0; i < static_cast<int>(blockDim.x); ++i) s += sm[i];
    out[blockIdx.x] = s;
  }
}

// out[w] = sum over warp w's lanes by a shuffle tree (the pattern of csrc/cuda's warp_reduce).
__global__ void warp_sum_kernel(const float* x, float* out) {
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  float v = x[t];
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
  if ((t & 31) == 0) out[t >> 5] = v;
}

// Declared for blocks of at most 64 threads.
__global__ void __launch_bounds__(64) bounded_kernel(float* out) { out[threadIdx.x] = 1.f; }

// Threads below `half` wait at a barrier the others never reach.
__global__ void divergent_barrier_kernel(int half) {
  if (static_cast<int>(threadIdx.x) < half) __syncthreads();
}

// Cooperative: block b puts b + 1 in out[b] (through its dynamic shared memory), then after the
// grid barrier reads the next block's: got[b] = out[(b + 1) % blocks]. skip 1: one thread of
// block 0 leaves before the barrier; skip 2: all of block 0 does.
__global__ void grid_exchange_kernel(float* out, float* got, int skip) {
  float* sm = dynamic_shared<float>();
  if (skip == 1 && blockIdx.x == 0 && threadIdx.x == 0) return;
  if (threadIdx.x == 1) {
    sm[0] = static_cast<float>(blockIdx.x + 1);
    out[blockIdx.x] = sm[0];
  }
  if (skip == 2 && blockIdx.x == 0) return;
  grid_sync();
  if (threadIdx.x == 1) got[blockIdx.x] = out[(blockIdx.x + 1) % gridDim.x];
}

// A static shared array (one for all blocks in the emulation, which refuses it cooperatively).
__global__ void static_shared_kernel(float* out) {
  __shared__ float sm[32];
  sm[threadIdx.x % 32] = 1.f;
  out[threadIdx.x] = sm[threadIdx.x % 32];
}

at::Tensor grid_exchange(int64_t blocks, int64_t threads, int64_t skip) {
  at::Tensor out = at::full({blocks}, -1.f);
  at::Tensor got = at::full({blocks}, -1.f);
  float* o = out.data_ptr<float>();
  float* g = got.data_ptr<float>();
  int sk = static_cast<int>(skip);
  void* args[] = {&o, &g, &sk};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(grid_exchange_kernel,
                                             dim3(static_cast<unsigned>(blocks)),
                                             dim3(static_cast<unsigned>(threads)), args,
                                             sizeof(float), nullptr));
  return got;
}

void static_shared_cooperative() {
  at::Tensor out = at::zeros({64}, at::kFloat);
  float* o = out.data_ptr<float>();
  void* args[] = {&o};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(static_shared_kernel, dim3(1), dim3(64), args, 0,
                                             nullptr));
}

at::Tensor block_sum(const at::Tensor& x, int64_t threads, bool barrier) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && x.numel() % threads == 0);
  at::Tensor out = at::empty({x.numel() / threads}, x.options());
  block_sum_kernel<<<static_cast<unsigned>(out.numel()), static_cast<unsigned>(threads)>>>(
      x.data_ptr<float>(), out.data_ptr<float>(), barrier);
  return out;
}

at::Tensor warp_sum(const at::Tensor& x, int64_t bx, int64_t by) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && x.numel() == bx * by);
  at::Tensor out = at::empty({x.numel() / 32}, x.options());
  warp_sum_kernel<<<1, dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by))>>>(
      x.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

void divergent_barrier(int64_t threads) {
  divergent_barrier_kernel<<<1, static_cast<unsigned>(threads)>>>(static_cast<int>(threads / 2));
}

void launch_config(int64_t gx, int64_t gy, int64_t bx, int64_t by) {
  divergent_barrier_kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
                             dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by))>>>(0);
}

at::Tensor bounded(int64_t threads) {
  at::Tensor out = at::zeros({threads}, at::kFloat);
  bounded_kernel<<<1, static_cast<unsigned>(threads)>>>(out.data_ptr<float>());
  return out;
}

}  // namespace fastnn_emu_check
