// Rotary position embedding on the CPU (the reference is fastwidth/kernels/rope.py): x (B, H, T,
// D) with any strides is read once and written rotated into a contiguous tensor, pairs
// (x[..., j], x[..., j + D/2]) by angle t * inv_freq_j, in fp32; inverse = rotate by minus the
// angle (the backward, the rotation's transpose).
#include "fastwidth.h"

#include <ATen/ops/empty.h>

namespace fastwidth {
// a named namespace per op family: the build compiles every .cpp as one translation unit
namespace rope {

template <typename T>
void rotate_rows(const at::Tensor& x, const float* cos, const float* sin, float sign, T* out) {
  const int64_t B = x.size(0), H = x.size(1), T_ = x.size(2), D = x.size(3), half = D / 2;
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
  const T* px = x.const_data_ptr<T>();
  at::parallel_for(0, B * H * T_, std::max<int64_t>(1, 8192 / D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r % T_, h = (r / T_) % H, b = r / (T_ * H);
      const T* xr = px + b * s0 + h * s1 + t * s2;
      const float *c = cos + t * half, *sn = sin + t * half;
      T* o = out + r * D;
      for (int64_t j = 0; j < half; ++j) {
        const float x1 = static_cast<float>(xr[j]), x2 = static_cast<float>(xr[j + half]);
        const float sj = sign * sn[j];
        o[j] = static_cast<T>(x1 * c[j] - x2 * sj);
        o[j + half] = static_cast<T>(x1 * sj + x2 * c[j]);
      }
    }
  });
}

at::Tensor rope_cpu(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in, bool inverse) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.size(3) % 2 == 0, "rope: x must be (B, H, T, D) with D even, got ",
              x_in.sizes());
  const int64_t T_ = x_in.size(2), half = x_in.size(3) / 2;
  TORCH_CHECK(cos_in.dim() == 2 && cos_in.size(0) >= T_ && cos_in.size(1) == half && sin_in.sizes() == cos_in.sizes(),
              "rope: cos/sin must be (>= T, D/2) = (>= ", T_, ", ", half, "), got ", cos_in.sizes());
  const at::Tensor x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  const at::Tensor cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope", [&] {
    rotate_rows<scalar_t>(x, cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), inverse ? -1.0f : 1.0f,
                          out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace rope

TORCH_LIBRARY_IMPL(fastwidth_native, CPU, m) { m.impl("rope", &rope::rope_cpu); }

}  // namespace fastwidth
