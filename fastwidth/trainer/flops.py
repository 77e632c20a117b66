"""Model FLOPs per token and model FLOPs utilization (MFU), as nanoGPT and torchtitan report them.

flops_per_token: counted from the model's shapes (one forward of one example on the meta
device, no memory, no compute), training = 3 x forward (backward is two GEMMs per forward one):
  - every MuLinear / MuReadout: 2 x in x out per row, so 6 x (parameters in matmuls) a token;
  - every Attention: the scores and values GEMMs, 2 x 2 x T^2 x d a sequence forward, so
    12 x L x T x d a token over L layers (PaLM appendix B; causal masking not subtracted);
  - every MuConv2d: 2 x (weight elements) x H_out x W_out an example.
Divided by the targets an example carries (T tokens, or 1 for classification), so it is per
unit of `tokens` in the train rows. Embeddings, norms and activations are not counted.
A model fastwidth did not write (model.arch python / hf: a user's nn.Linear, F.linear, matmul,
scaled_dot_product_attention) is counted by torch's own FlopCounterMode over the same meta
forward: every GEMM / BMM / convolution / attention op at 2 FLOPs a multiply-add, the same rule
(attention's causal half not subtracted either).

mfu = (sum of flops_per_token of the members trained in the step) x tokens_per_s / peak: the
share of the devices' peak the step's model FLOPs use. Peak: bf16 dense tensor-core FLOP/s
from the NVIDIA datasheets (H100/H200 SXM 989e12, H100 PCIe 756e12, A100 312e12) times the
ranks; on the CPU an fp32 GEMM measured once (a 1024^2 matmul, best of 5) and cached in
$XDG_CACHE_HOME/fastwidth/cpu_peak.json per processor and thread count. FASTWIDTH_PEAK_FLOPS
(FLOP/s a device) overrides both; an unknown GPU gives no mfu.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from fastwidth.kernels import dispatch

OWN_ARCHS = ("gpt", "mlp", "resnet")   # built from fastwidth.nn's layers, counted per layer
GPU_PEAK_BF16 = (("H100 PCIe", 756e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12))


def flops_per_token(cfg, io) -> float:
    """Training FLOPs (3 x forward) per target of one example of the model `cfg` builds for data
    `io`, counted on a meta-device copy (never the trained, perhaps sharded, model)."""
    from fastwidth.models import build_meta
    from fastwidth.nn import Attention, MuConv2d, MuLinear, TiedReadout
    meta = build_meta(cfg, io)
    per_example = io.seq_len if io.kind == "tokens" else 1
    if cfg.model.arch not in OWN_ARCHS:
        return 3.0 * _dispatch_count(meta, _example(io)) / per_example
    total = [0.0]

    def on_linear(mod, inp, out):
        total[0] += 2.0 * mod.in_features * mod.out_features * (out.numel() // mod.out_features)

    def on_conv(mod, inp, out):
        total[0] += 2.0 * mod.weight.numel() * out.shape[0] * out.shape[-1] * out.shape[-2]

    def on_attention(mod, inp, out):
        B, T, _ = inp[0].shape
        total[0] += 4.0 * B * T * T * mod.n_heads * mod.head_dim  # q k^T and p v
    hooks = [m.register_forward_hook(fn) for m in meta.modules()
             for cls, fn in (((MuLinear, TiedReadout, nn.Linear), on_linear), (MuConv2d, on_conv),
                             (Attention, on_attention))
             if isinstance(m, cls)]
    try:
        x = _example(io)
        with torch.no_grad(), dispatch.using("torch"):
            meta(x)
    finally:
        for h in hooks:
            h.remove()
    return 3.0 * total[0] / per_example


def _dispatch_count(meta, x: torch.Tensor) -> float:
    """Forward FLOPs of any module on one meta example, as torch.utils.flop_counter counts them.
    Under FakeTensorMode: transformers' mask code skips its data-dependent checks (.item(), which
    a meta tensor cannot give) for fake tensors, as it does when compiled."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(x)
    return float(counter.get_total_flops())


def _example(io) -> torch.Tensor:
    if io.kind == "tokens":
        return torch.zeros(1, io.seq_len, dtype=torch.long, device="meta")
    return torch.zeros(1, *io.in_shape, device="meta")


def device_peak(device) -> float | None:
    """Peak FLOP/s of one device (see the module note), or None for a GPU not in the table."""
    env = os.environ.get("FASTWIDTH_PEAK_FLOPS")
    if env:
        return float(env)
    if getattr(device, "type", str(device)) == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_BF16 if k in name), None)
    return cpu_peak()


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fastwidth" / "cpu_peak.json"


def cpu_peak(n: int = 1024, reps: int = 5) -> float:
    """fp32 GEMM FLOP/s of this CPU at torch's thread count: measured once, then read from the cache."""
    key = f"{platform.processor() or platform.machine()} threads={torch.get_num_threads()}"
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached.get(key), (int, float)):
        return float(cached[key])
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    peak = 2.0 * n ** 3 / best
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**cached, key: peak}))
    except OSError:  # a read-only home: measured again next time
        pass
    return peak


class MFU:
    """flops_per_token of every member (counted once) and the mfu of a logged step."""

    def __init__(self, members, io, device, ranks: int = 1):
        self.per_member = {m.name: flops_per_token(m.cfg, io) for m in members}
        peak = device_peak(device)
        self.peak = None if peak is None else peak * ranks

    def fields(self, member) -> dict:
        return {"flops_per_token": self.per_member[member.name]}

    def step_fields(self, members, extras: dict) -> dict:
        """{"mfu": ...} of the members trained in the step, from its tokens_per_s ({} without)."""
        rate = extras.get("tokens_per_s")
        if rate is None or not self.peak:
            return {}
        return {"mfu": sum(self.per_member[m.name] for m in members) * rate / self.peak}
