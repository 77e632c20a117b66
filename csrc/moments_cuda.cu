// One-pass moments and fixed-range histogram on CUDA (built only where nvcc and a CUDA torch are
// present; the GPU default is the Triton kernel of fastwidth/kernels/stats.py, this is the
// backend="native" path). Same contract as moments.cpp: fp64 power sums of x - shift per thread, NaN left out
// of min/max/histogram, outside values in the edge bins. Each block writes its partial row;
// the rows are added up by ATen on the device (deterministic, no host sync).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

namespace fastwidth {
namespace moments_cuda {

constexpr int kThreads = 256;

__device__ inline double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

__device__ inline float warp_min(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_down_sync(0xffffffffu, v, o));
  return v;
}

__device__ inline float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
  return v;
}

template <typename T>
__global__ void moments_kernel(const T* __restrict__ x, int64_t n, double shift, int64_t stride, double lo, double scale,
                               int bins,
                               double* __restrict__ part, unsigned long long* __restrict__ hist) {
  extern __shared__ unsigned int shist[];
  __shared__ double sred[4][kThreads / 32];
  __shared__ float mred[2][kThreads / 32];
  for (int b = threadIdx.x; b < bins; b += blockDim.x) shist[b] = 0;
  __syncthreads();
  double s1 = 0, s2 = 0, s3 = 0, s4 = 0;
  float mn = INFINITY, mx = -INFINITY;
  const double top = static_cast<double>(bins - 1);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = static_cast<float>(x[i]);
    const double d = v - shift, d2 = d * d;
    s1 += d, s2 += d2, s3 += d2 * d, s4 += d2 * d2;
    if (v == v) {  // fminf/fmaxf would skip NaN too; the histogram must
      mn = fminf(mn, v), mx = fmaxf(mx, v);
    }
    if (v == v && i % stride == 0) {
      const double t = fmin(fmax(floor((static_cast<double>(v) - lo) * scale), 0.0), top);  // fp64 bins, as moments.cpp
      atomicAdd(&shist[static_cast<int>(t)], 1u);
    }
  }
  s1 = warp_sum(s1), s2 = warp_sum(s2), s3 = warp_sum(s3), s4 = warp_sum(s4);
  mn = warp_min(mn), mx = warp_max(mx);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sred[0][warp] = s1, sred[1][warp] = s2, sred[2][warp] = s3, sred[3][warp] = s4;
    mred[0][warp] = mn, mred[1][warp] = mx;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double t[4] = {0, 0, 0, 0};
    float bmn = INFINITY, bmx = -INFINITY;
    for (int w = 0; w < kThreads / 32; ++w) {
      for (int k = 0; k < 4; ++k) t[k] += sred[k][w];
      bmn = fminf(bmn, mred[0][w]), bmx = fmaxf(bmx, mred[1][w]);
    }
    double* row = part + blockIdx.x * 6;
    for (int k = 0; k < 4; ++k) row[k] = t[k];
    row[4] = bmn, row[5] = bmx;
  }
  for (int b = threadIdx.x; b < bins; b += blockDim.x)
    if (shist[b]) atomicAdd(&hist[b], static_cast<unsigned long long>(shist[b]));
}

std::tuple<at::Tensor, at::Tensor> moments_histogram_cuda(const at::Tensor& x_in, double lo, double hi,
                                                          int64_t bins, double shift, int64_t hist_stride) {
  TORCH_CHECK(hi > lo && bins >= 1, "moments_histogram: need hi > lo and bins >= 1");
  TORCH_CHECK(x_in.numel() > 0, "moments_histogram: empty tensor");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(4 * sms, (n + kThreads * 8 - 1) / (kThreads * 8)));
  at::Tensor part = at::empty({blocks, 6}, x.options().dtype(at::kDouble));
  at::Tensor hist = at::zeros({bins}, x.options().dtype(at::kLong));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moments_histogram_cuda", [&] {
    moments_kernel<scalar_t><<<blocks, kThreads, bins * sizeof(unsigned int), stream>>>(
        x.const_data_ptr<scalar_t>(), n, shift, hist_stride, lo, bins / (hi - lo),
        static_cast<int>(bins), part.data_ptr<double>(),
        reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor none = hist.sum().eq(0);  // every value NaN: no min or max
  const at::Tensor nan = at::full({}, NAN, part.options());
  const at::Tensor mn = at::where(none, nan, part.select(1, 4).min());
  const at::Tensor mx = at::where(none, nan, part.select(1, 5).max());
  return {at::cat({part.narrow(1, 0, 4).sum(0), mn.reshape({1}), mx.reshape({1})}), hist};
}

}  // namespace moments_cuda

TORCH_LIBRARY_IMPL(fastwidth_native, CUDA, m) { m.impl("moments_histogram", &moments_cuda::moments_histogram_cuda); }

}  // namespace fastwidth
