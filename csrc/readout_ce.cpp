// The µP readout fused with cross-entropy on the CPU (the Triton kernel's design,
// fastwidth/kernels/readout_ce.py): rows in chunks; one ATen GEMM gives a chunk's logits in the
// input dtype; a row loop runs an online logsumexp over vocabulary blocks, writes the per-token
// loss, logsumexp, true-class logit and argmax, and overwrites the logits with dloss/dlogits;
// two more GEMMs turn that into dh and dW. One chunk of logits is alive, never tokens x vocab.
#include "fastwidth.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <limits>

namespace fastwidth {
// a named namespace per op family: the build compiles every .cpp as one translation unit
namespace readout_ce {

constexpr int64_t kBlock = 2048;  // vocabulary block of the online logsumexp: 8 KiB, in L1
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// max over the block; NaN never wins (it turns the sum of exponentials NaN instead)
FW_VECTOR_LOOP float block_max(const float* z, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

FW_VECTOR_LOOP float block_sum_exp(const float* z, int64_t n, float m) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += vexp(z[i] - m);
  return s;
}

// out_j = exp(z_j - lse) * pscale - off (out may be z)
FW_VECTOR_LOOP void softmax_grad(const float* z, int64_t n, float lse, float pscale, float off, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = vexp(z[i] - lse) * pscale - off;
}

struct RowStats {
  float loss, lse, zy;
  int64_t argmax;
};

struct Coefs {
  float z_loss, eps;
  int64_t ignore_index;
  bool grad;
};

// One row of fp32 logits z (V,): statistics, and dloss/dz written over z when c.grad.
RowStats ce_row(float* z, int64_t V, int64_t y, const Coefs& c) {
  const bool valid = y != c.ignore_index;
  TORCH_CHECK(!valid || (y >= 0 && y < V), "readout_ce: target ", y, " is outside [0, ", V, ")");
  float m = kNegInf, s = 0, zsum = 0;
  int64_t best = 0;
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t n = std::min(kBlock, V - v0);
    const float* zb = z + v0;
    const float bm = block_max(zb, n);
    if (bm > m) {  // strict >: ties keep the earlier block, so the first maximal index wins
      int64_t j = 0;
      while (zb[j] != bm) ++j;
      best = v0 + j;
      s *= std::exp(m - bm);
      m = bm;
    }
    zsum += lane_sum(zb, n);
    if (m > kNegInf) s += block_sum_exp(zb, n, m);
  }
  RowStats st;
  st.lse = m + std::log(s);
  const float zy = valid ? z[y] : 0.0f;
  const float loss = st.lse - (1.0f - c.eps) * zy - c.eps * zsum / V + c.z_loss * st.lse * st.lse;
  st.loss = valid ? loss : 0.0f;
  st.zy = zy;
  st.argmax = best;
  if (c.grad) {
    // dloss/dz_j = p_j (1 + 2 z_loss lse) - eps/V - (1 - eps) [j == y]; 0 for ignored rows
    if (valid) {
      softmax_grad(z, V, st.lse, 1.0f + 2.0f * c.z_loss * st.lse, c.eps / V, z);
      z[y] -= 1.0f - c.eps;
    } else {
      std::fill(z, z + V, 0.0f);
    }
  }
  return st;
}

template <typename T>
void ce_rows(at::Tensor& zc, const int64_t* tgt, const Coefs& c, float* loss, float* lse, float* zy, int64_t* am) {
  const int64_t rows = zc.size(0), V = zc.size(1);
  T* z = zc.data_ptr<T>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf;
    for (int64_t r = r0; r < r1; ++r) {
      T* zr = z + r * V;
      float* f = const_cast<float*>(as_float(zr, V, buf));
      const RowStats st = ce_row(f, V, tgt[r], c);
      loss[r] = st.loss, lse[r] = st.lse, zy[r] = st.zy, am[r] = st.argmax;
      if constexpr (!std::is_same_v<T, float>) {
        if (c.grad) store_as(f, V, zr);
      }
    }
  });
}

// Rows a chunk: about 32 MiB of logits, at least 64 rows so the GEMMs stay efficient.
int64_t default_chunk_rows(int64_t M, int64_t V, int64_t elem) {
  const int64_t rows = (int64_t{32} << 20) / std::max<int64_t>(1, V * elem);
  return std::min(M, std::max<int64_t>(64, rows));
}

using CEOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

CEOut readout_ce_cpu(const at::Tensor& h2_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& target_in, double multiplier, double z_loss, double label_smoothing,
                     int64_t ignore_index, bool compute_grad, int64_t chunk_rows) {
  TORCH_CHECK(h2_in.dim() == 2 && weight.dim() == 2 && h2_in.size(1) == weight.size(1),
              "readout_ce: h2 (M, N) and weight (V, N) expected");
  TORCH_CHECK(weight.scalar_type() == h2_in.scalar_type(), "readout_ce: weight and h2 dtypes differ");
  const at::Tensor h2 = h2_in.contiguous();
  const at::Tensor target = target_in.contiguous().to(at::kLong);
  const int64_t M = h2.size(0), N = h2.size(1), V = weight.size(0);
  const auto f32 = h2.options().dtype(at::kFloat);
  at::Tensor token_loss = at::empty({M}, f32), lse = at::empty({M}, f32), zy = at::empty({M}, f32);
  at::Tensor argmax = at::empty({M}, h2.options().dtype(at::kLong));
  at::Tensor dh, dw, db;
  if (compute_grad) {
    dh = at::empty_like(h2);
    dw = at::zeros({V, N}, f32);
    if (bias.has_value()) db = at::zeros({V}, f32);
  }
  const int64_t chunk = chunk_rows > 0 ? std::min(M, chunk_rows) : default_chunk_rows(M, V, h2.element_size());
  at::Tensor zbuf = at::empty({std::max<int64_t>(chunk, 1), V}, h2.options());
  const at::Tensor wt = weight.t();
  const Coefs c{static_cast<float>(z_loss), static_cast<float>(label_smoothing), ignore_index, compute_grad};
  for (int64_t a = 0; a < M; a += chunk) {
    const int64_t rows = std::min(chunk, M - a);
    const at::Tensor hc = h2.narrow(0, a, rows);
    at::Tensor zc = zbuf.narrow(0, 0, rows);
    if (bias.has_value()) {
      at::addmm_out(zc, *bias, hc, wt, 1.0, multiplier);
    } else {
      at::addmm_out(zc, zc, hc, wt, 0.0, multiplier);  // beta = 0: zc's old values are ignored
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, zc.scalar_type(), "readout_ce", [&] {
      ce_rows<scalar_t>(zc, target.const_data_ptr<int64_t>() + a, c, token_loss.data_ptr<float>() + a,
                        lse.data_ptr<float>() + a, zy.data_ptr<float>() + a, argmax.data_ptr<int64_t>() + a);
    });
    if (compute_grad) {  // zc now holds dloss/dlogits
      at::Tensor dhc = dh.narrow(0, a, rows);
      at::addmm_out(dhc, dhc, zc, weight, 0.0, multiplier);
      if (weight.scalar_type() == at::kFloat) {
        dw.addmm_(zc.t(), hc, 1.0, multiplier);
      } else {
        dw.add_(at::mm(zc.t(), hc), multiplier);
      }
      if (bias.has_value()) db.add_(at::sum(zc, {0}, false, at::kFloat));
    }
  }
  at::Tensor total = token_loss.sum();
  if (!compute_grad) {
    at::Tensor e = h2.new_empty({0});
    return {total, token_loss, lse, zy, argmax, e, h2.new_empty({0}), h2.new_empty({0})};
  }
  dw = dw.to(weight.scalar_type());
  db = bias.has_value() ? db.to(bias->scalar_type()) : h2.new_empty({0});
  return {total, token_loss, lse, zy, argmax, dh, dw, db};
}

}  // namespace readout_ce

TORCH_LIBRARY_IMPL(fastwidth_native, CPU, m) { m.impl("readout_ce", &readout_ce::readout_ce_cpu); }

}  // namespace fastwidth
