"""Benchmark cases, device-agnostic: inputs on a given device, the fast path and its baselines as
callables, and the formula of each rate. bench/gpu_bench.py times them on a GPU; any other
benchmark may import them (a CPU run passes device="cpu" and small sizes).

A Case holds `impls`: name -> a zero-argument callable that runs one forward + backward (or one
training step) and returns nothing. `work` is what one call does, in FLOPs (unit "TFLOP/s") or
bytes moved (unit "GB/s"); rate = work / seconds. `baseline` names the impl the fast path
("triton" unless said) is compared with; `targets` are the (baseline, min ratio) checks of issue 9.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

from fastwidth.kernels import act, attention, dispatch, linear, norm, readout_ce


@dataclass
class Case:
    case: str
    shape: str
    unit: str
    work: float
    impls: dict[str, Callable[[], None]]
    baseline: str
    fast: str = "triton"
    targets: list = field(default_factory=list)  # (metric, baseline impl, op, bound): "speed" or "peak_mib"
    note: str = ""


def leaf(*shape, device, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(True)


def fwd_bwd(f, inputs, grad=None) -> Callable[[], None]:
    def run():
        for t in inputs:
            t.grad = None
        out = f()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad if grad is not None and out.dim() else None)
    return run


# ---------------------------------------------------------------- attention


def flops_attention(B, H, T, D, causal):
    # forward: 2 GEMMs of 2 T^2 D a head; backward 2.5x forward (FlashAttention-2 paper); causal half
    return 3.5 * 4 * B * H * T * T * D * (0.5 if causal else 1.0)


def attention_case(device, T, D, B=2, H=None, dtype=torch.bfloat16) -> Case:
    H = H or 2048 // D  # model width 2048
    q, k, v = (leaf(B, H, T, D, device=device, dtype=dtype) for _ in range(3))
    do = torch.randn_like(q)
    sc = 1.0 / D
    impls = {"triton": fwd_bwd(lambda: attention.attention(q, k, v, scale=sc, backend="triton"), [q, k, v], do)}
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for name, be in [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]:
            def run(be=be):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sc)
            impls[name] = fwd_bwd(run, [q, k, v], do)
        base = "sdpa_flash"
    else:
        impls["sdpa"] = fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sc), [q, k, v], do)
        base = "sdpa"
    return Case("attention", f"B{B} H{H} T{T} D{D} causal {str(dtype)[6:]}", "TFLOP/s",
                flops_attention(B, H, T, D, True), impls, base, targets=[("speed", base, ">=", 0.9)])


# ---------------------------------------------------------------- readout + cross-entropy


def flops_readout(M, N, V):
    return 6 * M * N * V  # logits GEMM + dh GEMM + dW GEMM


def readout_ce_case(device, M=8192, N=1024, V=50257, dtype=torch.bfloat16) -> Case:
    h, w = leaf(M, N, device=device, dtype=dtype), leaf(V, N, device=device, dtype=dtype, scale=0.02)
    t = torch.randint(0, V, (M,), device=device)
    mult = 0.5

    def eager():
        return F.cross_entropy((F.linear(h, w) * mult).float(), t)
    impls = {"eager": fwd_bwd(eager, [h, w]),
             "triton": fwd_bwd(lambda: readout_ce.readout_cross_entropy(h, w, t, multiplier=mult, backend="triton"),
                               [h, w])}
    lce = getattr(F, "linear_cross_entropy", None)
    if lce is not None:
        impls["torch.linear_cross_entropy"] = fwd_bwd(lambda: lce(h * mult, w, t), [h, w])
    return Case("readout_ce", f"M{M} N{N} V{V} {str(dtype)[6:]}", "TFLOP/s", flops_readout(M, N, V), impls, "eager",
                targets=[("speed", "eager", ">=", 1.0), ("peak_mib", "eager", "<=", 0.25)])


# ---------------------------------------------------------------- norms and activations


def bytes_norm(M, N, elem):
    return M * N * elem * 5  # fwd reads x, writes y; bwd reads dy and x, writes dx


def norm_cases(device, M=16384, N=4096, dtype=torch.bfloat16) -> list[Case]:
    x, w, b = leaf(M, N, device=device, dtype=dtype), leaf(N, device=device, dtype=dtype), leaf(N, device=device,
                                                                                              dtype=dtype)
    dy = torch.randn_like(x)
    out = []
    for kind, is_rms in (("rms_norm", True), ("layer_norm", False)):
        bb = None if is_rms else b
        ins = [x, w] + ([] if is_rms else [b])
        fused = (lambda: F.rms_norm(x, (N,), w, 1e-6)) if is_rms else (lambda: F.layer_norm(x, (N,), w, b, 1e-5))
        impls = {"eager": fwd_bwd(lambda bb=bb, r=is_rms: norm.norm_ref(x, None, w, bb, 1e-5, r)[0], ins, dy),
                 "F." + kind: fwd_bwd(fused, ins, dy),
                 "triton": fwd_bwd(lambda bb=bb, r=is_rms: norm._norm(x, None, w, bb, 1e-5, r, "triton")[0], ins, dy)}
        out.append(Case(kind, f"M{M} N{N} {str(dtype)[6:]}", "GB/s", bytes_norm(M, N, x.element_size()), impls, "eager",
                        targets=[("speed", "eager", ">=", 1.5), ("speed", "F." + kind, ">=", 1.0)]))
    return out


def act_cases(device, M=16384, N=8192, dtype=torch.bfloat16) -> list[Case]:
    x, u = leaf(M, N, device=device, dtype=dtype), leaf(M, N, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    e = x.element_size()
    gelu = Case("gelu", f"M{M} N{N} {str(dtype)[6:]}", "GB/s", 5 * M * N * e,
                {"eager": fwd_bwd(lambda: act.gelu_ref(x), [x], dy),
                 "triton": fwd_bwd(lambda: act.gelu(x, backend="triton"), [x], dy)}, "eager",
                targets=[("speed", "eager", ">=", 0.95)],
                note="eager tanh-GELU is already one fused kernel each way: parity is the target")
    swiglu = Case("swiglu", f"M{M} N{N} {str(dtype)[6:]}", "GB/s", 8 * M * N * e,
                  {"eager": fwd_bwd(lambda: act.swiglu_ref(x, u), [x, u], dy),
                   "triton": fwd_bwd(lambda: act.swiglu(x, u, backend="triton"), [x, u], dy)}, "eager",
                  targets=[("speed", "eager", ">=", 1.5)])
    return [gelu, swiglu]


# ---------------------------------------------------------------- the fused µP linear


def linear_cases(device, dims=(2048, 4096, 8192), M=8192, dtype=torch.bfloat16) -> list[Case]:
    """The MLP's first layer, d -> 4d with GELU: the fused µP linear vs torch's addmm + gelu."""
    out = []
    for d in dims:
        x, w, b = leaf(M, d, device=device, dtype=dtype), leaf(4 * d, d, device=device, dtype=dtype,
                                                               scale=d ** -0.5), leaf(4 * d, device=device, dtype=dtype)
        dy = torch.randn(M, 4 * d, device=device, dtype=dtype)
        mult = 0.5  # a µP multiplier != 1, so neither path may skip it
        impls = {"torch": fwd_bwd(lambda: F.gelu(torch.addmm(b, x, w.t(), alpha=mult), approximate="tanh"),
                                  [x, w, b], dy),
                 "triton": fwd_bwd(lambda: linear.linear(x, w, b, alpha=mult, act="gelu", backend="triton"),
                                   [x, w, b], dy)}
        out.append(Case("linear_gelu", f"M{M} d{d} -> {4 * d} {str(dtype)[6:]}", "TFLOP/s", 6 * M * d * 4 * d,
                        impls, "torch", targets=[("speed", "torch", ">=", 1.0)],
                        note="linear_gelu: 6 M d 4d FLOPs (forward GEMM, dx and dW GEMMs)"))
    return out


# ---------------------------------------------------------------- the GPT training step


def gpt_step_case(device, width=2048, depth=12, B=8, T=1024, V=50304, head_dim=128, compile_impls=True) -> Case:
    """One training step (bf16 autocast forward, backward, AdamW) of a µP GPT, per implementation:
    eager torch ops, the Triton kernels, torch.compile, kernels + compile (the compiled ones last:
    their compile is what a deadline may cut). Work: the loop's model FLOPs a token
    (fastwidth.trainer.flops: 6 x matmul parameters + 12 L T d), so rate / peak is its MFU."""
    from fastwidth.config import Config
    from fastwidth.models import build_model
    from fastwidth.trainer.flops import flops_per_token
    cfg = Config()
    cfg.model.arch, cfg.model.width, cfg.model.depth, cfg.model.head_dim = "gpt", width, depth, head_dim
    io = SimpleNamespace(kind="tokens", vocab_size=V, seq_len=T, in_shape=None, num_classes=None)
    x = torch.randint(0, V, (B, T + 1), device=device)
    states: dict = {}  # one model and optimizer per impl, built on its first call (its warmup)

    def impl(backend, compiled):
        def run():
            state = states.get((backend, compiled))
            if state is None:
                dispatch.set_backend(backend)
                model, _ = build_model(cfg, io, device=device, seed=0)
                state = states[(backend, compiled)] = dict(
                    model=model, opt=torch.optim.AdamW(model.parameters(), lr=1e-4),
                    loss=torch.compile(model.loss) if compiled else model.loss)
            dispatch.set_backend(backend)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = state["loss"](x[:, :-1], x[:, 1:])
            loss.backward()
            state["opt"].step()
            state["opt"].zero_grad(set_to_none=True)
        return run
    impls = {"eager": impl("torch", False), "triton": impl("triton", False)}
    if compile_impls:
        impls["torch.compile"] = impl("torch", True)
        impls["triton+compile"] = impl("triton", True)
    work = B * T * flops_per_token(cfg, io)
    return Case("gpt_step", f"gpt w{width} L{depth} B{B} T{T} V{V} bf16-autocast", "TFLOP/s", work, impls, "eager",
                targets=[("speed", "eager", ">", 1.0)] + ([("speed", "torch.compile", ">", 1.0)] if compile_impls else []))
