// RMSNorm and LayerNorm over the last dim on the CPU, forward and backward, optionally fused
// with the residual add (the Triton kernels' contract, fastwidth/kernels/norm.py): s = x +
// residual is rounded to the input dtype before it is normalized, statistics in fp32, and the
// per-row RMS of s comes out for the coordinate statistics. Rows run in parallel; dweight and
// dbias are summed per fixed block of rows, then over blocks in order (deterministic).
#include "fastwidth.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <cmath>

namespace fastwidth {
// a named namespace per op family: the build compiles every .cpp as one translation unit
namespace norm {

constexpr int64_t kBlockRows = 32;  // rows whose dweight/dbias share one fp32 partial row

std::vector<float> as_float_vector(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return {};
  const at::Tensor f = t->to(at::kFloat).contiguous();
  return std::vector<float>(f.const_data_ptr<float>(), f.const_data_ptr<float>() + f.numel());
}

int64_t row_grain(int64_t N) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N)); }

struct FwdArgs {
  int64_t M, N;
  float eps;
  bool is_rms;
  const float* w;  // nullptr: no weight
  const float* b;  // nullptr: no bias
};

template <typename T>
void fwd_rows(const T* x, const T* r, T* y, T* s_out, float* mean, float* rstd, float* rms, const FwdArgs& a) {
  const int64_t N = a.N;
  at::parallel_for(0, a.M, row_grain(N), [&](int64_t r0, int64_t r1) {
    std::vector<float> sbuf(N);
    float* sf = sbuf.data();
    for (int64_t row = r0; row < r1; ++row) {
      const T* xr = x + row * N;
      if (r != nullptr) {
        const T* rr = r + row * N;
        T* so = s_out + row * N;
        for (int64_t j = 0; j < N; ++j) {
          const T sj = static_cast<T>(static_cast<float>(xr[j]) + static_cast<float>(rr[j]));
          so[j] = sj;
          sf[j] = static_cast<float>(sj);
        }
      } else {
        for (int64_t j = 0; j < N; ++j) sf[j] = static_cast<float>(xr[j]);
      }
      const float ms = lane_dot(sf, sf, N, 0.0f) / N;
      rms[row] = std::sqrt(ms);
      float mu = 0.0f, rs;
      if (a.is_rms) {
        rs = 1.0f / std::sqrt(ms + a.eps);
      } else {
        mu = lane_sum(sf, N) / N;
        rs = 1.0f / std::sqrt(lane_dot(sf, sf, N, mu) / N + a.eps);
      }
      mean[row] = mu;
      rstd[row] = rs;
      T* yr = y + row * N;
      for (int64_t j = 0; j < N; ++j) {
        float v = (sf[j] - mu) * rs;
        if (a.w != nullptr) v *= a.w[j];
        if (a.b != nullptr) v += a.b[j];
        yr[j] = static_cast<T>(v);
      }
    }
  });
}

using FwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

FwdOut norm_fwd_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& residual,
                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                    bool is_rms) {
  const int64_t N = x_in.size(-1);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = N > 0 ? x.numel() / N : 0;
  at::Tensor r;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes(), "norm_fwd: residual and x shapes differ");
    r = residual->to(x.scalar_type()).contiguous();
  }
  const std::vector<float> w = as_float_vector(weight), b = as_float_vector(bias);
  TORCH_CHECK(w.empty() || int64_t(w.size()) == N, "norm_fwd: weight has ", w.size(), " elements, not ", N);
  TORCH_CHECK(b.empty() || int64_t(b.size()) == N, "norm_fwd: bias has ", b.size(), " elements, not ", N);
  at::Tensor y = at::empty_like(x);
  at::Tensor s = residual.has_value() ? at::empty_like(x) : x.new_empty({0});
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty(lead, f32), rstd = at::empty(lead, f32), rms = at::empty(lead, f32);
  const FwdArgs a{M, N, static_cast<float>(eps), is_rms, w.empty() ? nullptr : w.data(),
                  b.empty() ? nullptr : b.data()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "norm_fwd", [&] {
    fwd_rows<scalar_t>(x.const_data_ptr<scalar_t>(), r.defined() ? r.const_data_ptr<scalar_t>() : nullptr,
                       y.data_ptr<scalar_t>(), r.defined() ? s.data_ptr<scalar_t>() : nullptr,
                       mean.data_ptr<float>(), rstd.data_ptr<float>(), rms.data_ptr<float>(), a);
  });
  return {y, s, mean, rstd, rms};
}

struct BwdArgs {
  int64_t M, N;
  bool is_rms;
  const float* w;
  const float* mean;
  const float* rstd;
};

// dx = (w dy - xhat c1 - c2) rstd (+ ds), c1 = mean(xhat w dy), c2 = mean(w dy) (0 for RMSNorm);
// part rows: dweight partials (nblocks, N) then dbias partials (nblocks, N).
template <typename T>
void bwd_rows(const T* dy, const T* ds, const T* s, T* dx, float* part, const BwdArgs& a) {
  const int64_t N = a.N, nblocks = (a.M + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(3 * N);
    float *xhat = buf.data(), *g = xhat + N, *wdy = g + N;
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* pdw = part + blk * N;
      float* pdb = part + (nblocks + blk) * N;
      for (int64_t row = blk * kBlockRows; row < std::min(a.M, (blk + 1) * kBlockRows); ++row) {
        const T *sr = s + row * N, *gr = dy + row * N;
        const float mu = a.mean[row], rs = a.rstd[row];
        for (int64_t j = 0; j < N; ++j) {
          xhat[j] = (static_cast<float>(sr[j]) - mu) * rs;
          g[j] = static_cast<float>(gr[j]);
          wdy[j] = a.w != nullptr ? g[j] * a.w[j] : g[j];
        }
        const float c1 = lane_dot(xhat, wdy, N, 0.0f) / N;
        const float c2 = a.is_rms ? 0.0f : lane_sum(wdy, N) / N;
        T* dxr = dx + row * N;
        const T* dsr = ds != nullptr ? ds + row * N : nullptr;
        for (int64_t j = 0; j < N; ++j) {
          float v = (wdy[j] - xhat[j] * c1 - c2) * rs;
          if (dsr != nullptr) v += static_cast<float>(dsr[j]);
          dxr[j] = static_cast<T>(v);
          pdw[j] += g[j] * xhat[j];
          pdb[j] += g[j];
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_cpu(const at::Tensor& dy_in,
                                                            const std::optional<at::Tensor>& ds_in,
                                                            const at::Tensor& s_in,
                                                            const std::optional<at::Tensor>& weight,
                                                            const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                                            bool is_rms, bool has_bias) {
  const at::Tensor s = s_in.contiguous();
  const at::Tensor dy = dy_in.to(s.scalar_type()).contiguous();
  at::Tensor ds;
  if (ds_in.has_value()) ds = ds_in->to(s.scalar_type()).contiguous();
  const at::Tensor mean = mean_in.to(at::kFloat).contiguous(), rstd = rstd_in.to(at::kFloat).contiguous();
  const int64_t N = s.size(-1);
  const int64_t M = N > 0 ? s.numel() / N : 0;
  const std::vector<float> w = as_float_vector(weight);
  at::Tensor dx = at::empty_like(s);
  const int64_t nblocks = (M + kBlockRows - 1) / kBlockRows;
  at::Tensor part = at::zeros({2, nblocks, N}, s.options().dtype(at::kFloat));
  const BwdArgs a{M, N, is_rms, w.empty() ? nullptr : w.data(), mean.const_data_ptr<float>(),
                  rstd.const_data_ptr<float>()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "norm_bwd", [&] {
    bwd_rows<scalar_t>(dy.const_data_ptr<scalar_t>(), ds.defined() ? ds.const_data_ptr<scalar_t>() : nullptr,
                       s.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), part.data_ptr<float>(), a);
  });
  const auto wdtype = weight.has_value() ? weight->scalar_type() : s.scalar_type();
  at::Tensor dw = weight.has_value() ? part[0].sum(0).to(wdtype) : s.new_empty({0});
  at::Tensor db = has_bias ? part[1].sum(0).to(wdtype) : s.new_empty({0});
  return {dx, dw, db};
}

}  // namespace norm

TORCH_LIBRARY_IMPL(fastwidth_native, CPU, m) {
  m.impl("norm_fwd", &norm::norm_fwd_cpu);
  m.impl("norm_bwd", &norm::norm_bwd_cpu);
}

}  // namespace fastwidth
