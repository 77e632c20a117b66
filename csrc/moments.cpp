// One-pass moments and fixed-range histogram on the CPU: fp64 power sums of x - shift, NaN-free min/max,
// and `bins` equal bins on [lo, hi) with outside values in the edge bins (the Triton kernel's
// contract, fastwidth/kernels/stats.py). x is cut into fixed chunks (independent of the thread
// count); each chunk's partials are kept and added up in chunk order, so results are
// deterministic.
#include "fastwidth.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <limits>

namespace fastwidth {
// a named namespace per op family: the build compiles every .cpp as one translation unit
namespace moments {

constexpr int64_t kChunk = 1 << 15;  // elements a task: 128 KiB of fp32, stays in L2

struct ChunkStats {
  double s1 = 0, s2 = 0, s3 = 0, s4 = 0;
  float mn = std::numeric_limits<float>::infinity();
  float mx = -std::numeric_limits<float>::infinity();
};

FW_VECTOR_LOOP
ChunkStats power_sums(const float* x, int64_t n, double shift) {
  double s1 = 0, s2 = 0, s3 = 0, s4 = 0;
  float mn = std::numeric_limits<float>::infinity(), mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(+ : s1, s2, s3, s4) reduction(min : mn) reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const double d = v - shift, d2 = d * d;
    s1 += d, s2 += d2, s3 += d2 * d, s4 += d2 * d2;
    // comparisons with NaN are false: NaN never enters min/max
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  ChunkStats out;
  out.s1 = s1, out.s2 = s2, out.s3 = s3, out.s4 = s4, out.mn = mn, out.mx = mx;
  return out;
}

// Bin = floor((x - lo) * bins / (hi - lo)) clamped to [0, bins - 1], in fp64: the same bins as
// numpy.histogram of the clipped values (the statistics' reference) even where |lo| is many bin
// widths (fp32 there would misplace values near an edge).
void histogram(const float* x, int64_t n, int64_t first, int64_t stride, double lo, double scale, int64_t bins,
               int64_t* hist) {
  const double top = static_cast<double>(bins - 1);
  for (int64_t i = first; i < n; i += stride) {
    const float v = x[i];
    if (v != v) continue;  // NaN
    double t = std::floor((static_cast<double>(v) - lo) * scale);
    t = t < 0.0 ? 0.0 : (t > top ? top : t);
    ++hist[static_cast<int64_t>(t)];
  }
}

std::tuple<at::Tensor, at::Tensor> moments_histogram_cpu(const at::Tensor& x_in, double lo, double hi,
                                                         int64_t bins, double shift, int64_t hist_stride) {
  TORCH_CHECK(hi > lo && bins >= 1, "moments_histogram: need hi > lo and bins >= 1, got lo=", lo,
              ", hi=", hi, ", bins=", bins);
  TORCH_CHECK(x_in.numel() > 0, "moments_histogram: empty tensor");
  TORCH_CHECK(hist_stride >= 1, "moments_histogram: hist_stride must be >= 1, got ", hist_stride);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<ChunkStats> parts(nchunks);
  std::vector<int64_t> hists(nchunks * bins, 0);
  const double scale = bins / (hi - lo);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moments_histogram", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<float> buf;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t a = c * kChunk, len = std::min(kChunk, n - a);
        const float* f = as_float(p + a, len, buf);
        parts[c] = power_sums(f, len, shift);
        const int64_t first = (hist_stride - a % hist_stride) % hist_stride;  // global index % stride == 0
        histogram(f, len, first, hist_stride, lo, scale, bins, hists.data() + c * bins);
      }
    });
  });
  at::Tensor sums = at::empty({6}, x.options().dtype(at::kDouble));
  at::Tensor hist = at::zeros({bins}, x.options().dtype(at::kLong));
  double* s = sums.data_ptr<double>();
  int64_t* h = hist.data_ptr<int64_t>();
  ChunkStats tot;
  for (int64_t c = 0; c < nchunks; ++c) {
    const ChunkStats& q = parts[c];
    tot.s1 += q.s1, tot.s2 += q.s2, tot.s3 += q.s3, tot.s4 += q.s4;
    tot.mn = q.mn < tot.mn ? q.mn : tot.mn;
    tot.mx = q.mx > tot.mx ? q.mx : tot.mx;
    for (int64_t b = 0; b < bins; ++b) h[b] += hists[c * bins + b];
  }
  int64_t counted = 0;
  for (int64_t b = 0; b < bins; ++b) counted += h[b];
  const double nan = std::numeric_limits<double>::quiet_NaN();
  s[0] = tot.s1, s[1] = tot.s2, s[2] = tot.s3, s[3] = tot.s4;
  s[4] = counted ? static_cast<double>(tot.mn) : nan;  // all NaN: no min or max
  s[5] = counted ? static_cast<double>(tot.mx) : nan;
  return {sums, hist};
}

}  // namespace moments

TORCH_LIBRARY_IMPL(fastwidth_native, CPU, m) { m.impl("moments_histogram", &moments::moments_histogram_cpu); }

}  // namespace fastwidth
