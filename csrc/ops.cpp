// The schemas of every fastwidth native op, declared once in the fastwidth_native namespace.
// Kernels: <op>.cpp registers CPU (TORCH_LIBRARY_IMPL), <op>_cuda.cu registers CUDA where
// nvcc built it. Python (fastwidth/kernels/native.py) builds, loads and registers fakes and
// autograd; the functionals reach these through backend="native".
#include <torch/library.h>

TORCH_LIBRARY(fastwidth_native, m) {
  // x any shape -> ((sum, sumsq, sum3, sum4) of x - shift, min, max of x) fp64, hist (bins,)
  // int64, bins computed in fp64); NaN left out of min, max and hist; values outside [lo, hi)
  // in the edge bins. A shift near the mean keeps central moments from cancelling when
  // |mean| >> std. hist_stride k > 1: the histogram counts every k-th element only.
  m.def(
      "moments_histogram(Tensor x, float lo, float hi, int bins, float shift=0.0, int hist_stride=1) "
      "-> (Tensor, Tensor)");
  // readout + cross-entropy over rows in chunks -> (total, token_loss, lse, true_logit, argmax,
  // dh, dw, db); the gradients (of the summed token loss) come from the forward when compute_grad.
  m.def(
      "readout_ce(Tensor h2, Tensor weight, Tensor? bias, Tensor target, float multiplier, "
      "float z_loss, float label_smoothing, int ignore_index, bool compute_grad, int chunk_rows) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // s = x + residual (or x); y = norm(s) * weight + bias -> (y, s, mean, rstd, rms)
  m.def(
      "norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool is_rms) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // -> (dx (+ ds), dweight, dbias)
  m.def(
      "norm_bwd(Tensor dy, Tensor? ds, Tensor s, Tensor? weight, Tensor mean, Tensor rstd, "
      "bool is_rms, bool has_bias) -> (Tensor, Tensor, Tensor)");
  // x (B, H, T, D) any strides, cos/sin (>= T, D/2) -> contiguous rotated x; inverse rotates by
  // -angle (the backward).
  m.def("rope(Tensor x, Tensor cos, Tensor sin, bool inverse) -> Tensor");
}
