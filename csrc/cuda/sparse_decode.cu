// CUDA sparse decode kernels (declarations and contract: sparse_decode.cuh). Deliberately simple
// (one output column per thread, fp32/fp64 accumulation); to be tuned on a GPU.
#include "sparse_decode.cuh"

namespace sparsekern {
namespace cuda {
namespace {

constexpr int kThreads = 128;      // output columns per block in the forward / weight-grad
constexpr int kChunk = kThreads;   // (index, value) pairs staged in shared memory per round
constexpr int kWarpsPerBlock = 8;  // values-grad: one warp per (row, slot)
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  __device__ __forceinline__ static float load(float x) { return x; }
  __device__ __forceinline__ static float store(float a) { return a; }
};
template <>
struct Cvt<double> {
  __device__ __forceinline__ static double load(double x) { return x; }
  __device__ __forceinline__ static double store(double a) { return a; }
};
template <>
struct Cvt<__nv_bfloat16> {
  __device__ __forceinline__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 store(float a) { return __float2bfloat16_rn(a); }
};
template <>
struct Cvt<__half> {
  __device__ __forceinline__ static float load(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half store(float a) { return __float2half_rn(a); }
};

// grid (N, ceil(d / kThreads)): block (n, tile) writes out[n, tile*kThreads + tid]. The row's
// (index, value) pairs go through shared memory; W reads are coalesced across the block.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sparse_decode_kernel(const Acc<T>* __restrict__ values, const int64_t* __restrict__ indices,
                         int64_t k, const T* __restrict__ W, int64_t ldw, int64_t d,
                         const Acc<T>* __restrict__ bias, T* __restrict__ out) {
  using A = Acc<T>;
  __shared__ A s_val[kChunk];
  __shared__ int64_t s_idx[kChunk];
  const int64_t n = blockIdx.x;
  const int64_t c = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  const bool active = c < d;  // inactive threads still take part in the staging/barriers
  A acc = (active && bias != nullptr) ? bias[c] : A(0);
  const A* v = values + n * k;
  const int64_t* ix = indices + n * k;
  for (int64_t j0 = 0; j0 < k; j0 += kChunk) {
    const int m = static_cast<int>(k - j0 < kChunk ? k - j0 : kChunk);
    __syncthreads();  // previous round's readers are done
    if (threadIdx.x < m) {
      s_val[threadIdx.x] = v[j0 + threadIdx.x];
      s_idx[threadIdx.x] = ix[j0 + threadIdx.x];
    }
    __syncthreads();
    if (active) {
      for (int j = 0; j < m; ++j) acc += s_val[j] * Cvt<T>::load(W[s_idx[j] * ldw + c]);
    }
  }
  if (active) out[n * d + c] = Cvt<T>::store(acc);
}

// One warp per flat slot w = n*k + j: lane-strided dot product, then a shuffle reduction.
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    backward_values_kernel(const T* __restrict__ grad_out, const int64_t* __restrict__ indices,
                           int64_t total, int64_t k, const T* __restrict__ W, int64_t ldw,
                           int64_t d, T* __restrict__ grad_values) {
  using A = Acc<T>;
  const int64_t w = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (w >= total) return;  // whole warps exit together: the shuffles below stay full-mask
  const T* g = grad_out + (w / k) * d;
  const T* r = W + indices[w] * ldw;
  A s = A(0);
  for (int64_t c = lane; c < d; c += 32) s += Cvt<T>::load(g[c]) * Cvt<T>::load(r[c]);
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
  if (lane == 0) grad_values[w] = Cvt<T>::store(s);
}

// grid (d_sae, ceil(d / kThreads)): block (f, tile) reduces feature f's segment for its columns.
// Each block owns its output row slice: no atomics; empty segments write zeros.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_weight_kernel(const T* __restrict__ grad_out, const Acc<T>* __restrict__ sorted_values,
                           const int64_t* __restrict__ sorted_rows,
                           const int64_t* __restrict__ offsets, int64_t d, T* __restrict__ grad_W) {
  using A = Acc<T>;
  __shared__ A s_val[kChunk];
  __shared__ int64_t s_row[kChunk];
  const int64_t f = blockIdx.x;
  const int64_t c = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  const bool active = c < d;
  const int64_t e0 = offsets[f], e1 = offsets[f + 1];
  A acc = A(0);
  for (int64_t e = e0; e < e1; e += kChunk) {
    const int m = static_cast<int>(e1 - e < kChunk ? e1 - e : kChunk);
    __syncthreads();
    if (threadIdx.x < m) {
      s_val[threadIdx.x] = sorted_values[e + threadIdx.x];
      s_row[threadIdx.x] = sorted_rows[e + threadIdx.x];
    }
    __syncthreads();
    if (active) {
      for (int i = 0; i < m; ++i) acc += s_val[i] * Cvt<T>::load(grad_out[s_row[i] * d + c]);
    }
  }
  if (active) grad_W[f * d + c] = Cvt<T>::store(acc);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

template <typename T>
cudaError_t launch_sparse_decode(const Acc<T>* values, const int64_t* indices, int64_t N,
                                 int64_t k, const T* W, int64_t ldw, int64_t d,
                                 const Acc<T>* bias, T* out, cudaStream_t stream) {
  if (N == 0 || d == 0) return cudaSuccess;
  const int64_t tiles = ceil_div(d, kThreads);
  if (N > kMaxGridX || tiles > kMaxGridY) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(tiles));
  sparse_decode_kernel<T><<<grid, kThreads, 0, stream>>>(values, indices, k, W, ldw, d, bias, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_sparse_decode_backward_values(const T* grad_out, const int64_t* indices,
                                                 int64_t N, int64_t k, const T* W, int64_t ldw,
                                                 int64_t d, T* grad_values, cudaStream_t stream) {
  const int64_t total = N * k;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(total, kWarpsPerBlock);
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  backward_values_kernel<T><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
      grad_out, indices, total, k, W, ldw, d, grad_values);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_sparse_decode_backward_weight(const T* grad_out, const Acc<T>* sorted_values,
                                                 const int64_t* sorted_rows,
                                                 const int64_t* offsets, int64_t d_sae,
                                                 int64_t d, T* grad_W, cudaStream_t stream) {
  if (d_sae == 0 || d == 0) return cudaSuccess;
  const int64_t tiles = ceil_div(d, kThreads);
  if (d_sae > kMaxGridX || tiles > kMaxGridY) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(d_sae), static_cast<unsigned>(tiles));
  backward_weight_kernel<T><<<grid, kThreads, 0, stream>>>(grad_out, sorted_values, sorted_rows,
                                                           offsets, d, grad_W);
  return cudaGetLastError();
}

#define SK_INSTANTIATE(T)                                                                        \
  template cudaError_t launch_sparse_decode<T>(const Acc<T>*, const int64_t*, int64_t, int64_t, \
                                               const T*, int64_t, int64_t, const Acc<T>*, T*,   \
                                               cudaStream_t);                                   \
  template cudaError_t launch_sparse_decode_backward_values<T>(                                 \
      const T*, const int64_t*, int64_t, int64_t, const T*, int64_t, int64_t, T*, cudaStream_t); \
  template cudaError_t launch_sparse_decode_backward_weight<T>(                                 \
      const T*, const Acc<T>*, const int64_t*, const int64_t*, int64_t, int64_t, T*, cudaStream_t);

SK_INSTANTIATE(float)
SK_INSTANTIATE(double)
SK_INSTANTIATE(__nv_bfloat16)
SK_INSTANTIATE(__half)
#undef SK_INSTANTIATE

}  // namespace cuda
}  // namespace sparsekern
