"""Evaluation hooks keep only what the statistics need, in micro-batches (issue 11, item 5).

For the real MLP and GPT: the probe signature and the preactivation histogram ranges computed in
micro-batches of stats.eval_batch equal the whole-probe pass (and the ranges equal the offline
quantiles of every value); and the bytes the hooks keep alive at the end of each forward stay at
the kernel rows / the strided sample, far below one block output (the old hooks kept every
feature layer's whole output until the forward ended, and every preactivation of the probe).
"""
import gc
import warnings
from types import SimpleNamespace

import pytest
import torch

from fastwidth.config import load_config
from fastwidth.models import build_model
from fastwidth.stats import preact_range
from fastwidth.stats.preact_range import quantile_ranges, reference_ranges
from fastwidth.stats.signature import ProbeSpec, probe_signature

MLP_IO = SimpleNamespace(kind="classes", in_shape=(12,), num_classes=5)
GPT_IO = SimpleNamespace(kind="tokens", vocab_size=11, seq_len=16)


def _model(arch: str, width: int):
    if arch == "mlp":
        cfg = load_config(None, ["model.arch=mlp", "model.depth=3", "param.base_width=32", f"model.width={width}",
                                 "param.zero_readout=false"])
        io = MLP_IO
    else:
        cfg = load_config(None, ["model.arch=gpt", "model.depth=2", "model.head_dim=16", "param.base_width=32",
                                 "data.seq_len=16", f"model.width={width}", "param.zero_readout=false"])
        io = GPT_IO
    model, _ = build_model(cfg, io, device="cpu", seed=3)
    return model


def _probe(arch: str, n: int) -> dict:
    g = torch.Generator().manual_seed(5)
    if arch == "mlp":
        return {"x": torch.randn(n, 12, generator=g), "y": torch.randint(0, 5, (n,), generator=g)}
    return {"x": torch.randint(0, 11, (n, 16), generator=g), "y": torch.randint(0, 11, (n, 16), generator=g)}


def _spec(probe: dict, eval_batch: int) -> ProbeSpec:
    return ProbeSpec.build(probe, signature_points=10_000, kernel_points=23, sketch_dim=6, sketch_seed=1,
                           eval_batch=eval_batch)


def _live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every real tensor Python can reach now (a fake or meta
    tensor that an earlier test of the session left has no storage and holds no memory)."""
    seen = {}
    with warnings.catch_warnings():     # isinstance on torch.distributed's deprecated reduce_op warns
        warnings.simplefilter("ignore")
        live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for o in live:
        if o.is_meta:
            continue
        try:
            st = o.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):   # fake / functional tensors other tests left: no storage
            continue
    return sum(seen.values())


class RetainedAtForwardEnd:
    """Largest excess of live tensor bytes over a baseline at the end of any forward of `model`
    (beyond the forward's own output, alive there by definition); and the largest input batch."""

    def __init__(self, model):
        self.baseline, self.peak, self.rows = _live_tensor_bytes(), 0, 0
        self._hooks = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, _mod, inp):
        self.rows = max(self.rows, inp[0].shape[0])

    def _post(self, _mod, _inp, out):
        self.peak = max(self.peak, _live_tensor_bytes() - self.baseline - out.untyped_storage().nbytes())

    def remove(self):
        for h in self._hooks:
            h.remove()


@pytest.mark.parametrize("arch", ["mlp", "gpt"])
def test_micro_batched_signature_equals_whole_probe(arch):
    model = _model(arch, 48)
    probe = _probe(arch, 13)
    feats = model.feature_points()
    whole, s_whole = probe_signature(model, _spec(probe, 13), "cpu", feats)
    micro, s_micro = probe_signature(model, _spec(probe, 4), "cpu", feats)   # 4 + 4 + 4 + 1 examples
    assert whole.keys() == micro.keys() and any(k.startswith("kernel/") for k in whole)
    for k in whole:
        tol = 2e-3 if whole[k].dtype == torch.float16 else 1e-5
        torch.testing.assert_close(micro[k], whole[k], rtol=tol, atol=tol, msg=k)
    assert s_micro["loss"] == pytest.approx(s_whole["loss"], rel=1e-6)
    assert s_micro["accuracy"] == s_whole["accuracy"]


@pytest.mark.parametrize("arch", ["mlp", "gpt"])
def test_signature_hooks_keep_only_kernel_rows(arch):
    width = 256
    n = 64 if arch == "mlp" else 8                       # 64 or 128 points, 23 of them kernel points
    batch = n                                            # one forward: the kernel rows all come from it
    model = _model(arch, width)
    probe = _probe(arch, n)
    spec = _spec(probe, batch)
    feats = model.feature_points()
    probe_signature(model, spec, "cpu", feats)          # warm-up: lazy caches (projection) join the baseline
    meter = RetainedAtForwardEnd(model)
    try:
        probe_signature(model, spec, "cpu", feats)
    finally:
        meter.remove()
    points = probe["y"].numel()
    block_bytes = points * width * 4                     # one feature layer's output of that forward (fp32)
    rows_bytes = len(feats) * len(spec.kernel_index) * width * 4
    print(f"{arch}: retained {meter.peak} B at forward end; one block output {block_bytes} B, "
          f"{len(feats)} feature layers, kernel rows {rows_bytes} B")
    assert meter.rows <= batch
    # the old hooks kept every feature layer's output: >= len(feats) * block_bytes
    assert meter.peak <= rows_bytes + block_bytes // 4


@pytest.mark.parametrize("arch", ["mlp", "gpt"])
def test_micro_batched_ranges_equal_offline_quantiles(arch, monkeypatch):
    monkeypatch.setattr(preact_range, "MAX_VALUES", 300)   # a stride > 1 with phase changes across batches
    models = [_model(arch, 48), _model(arch, 48)]
    models[1].load_state_dict({k: v * 1.1 for k, v in models[0].state_dict().items()})  # a second "seed"
    probe = _probe(arch, 11)
    micro = reference_ranges(models, probe["x"], 3, "cpu", q=0.01, margin=0.5)
    whole = reference_ranges(models, probe["x"], 11, "cpu", q=0.01, margin=0.5)
    # offline: every value of every model, concatenated, then the same fixed stride
    values = {}
    for m in models:
        hooks = [mod.register_forward_hook(lambda _m, _i, out, k=k: values.setdefault(k, []).append(out.reshape(-1)))
                 for k, mod in m.preact_points().items()]
        with torch.no_grad():
            m.eval()
            m(probe["x"])
        for h in hooks:
            h.remove()
    offline = {}
    for k, parts in values.items():
        v = torch.cat(parts)
        offline[k] = v[:: max(1, v.numel() // 300)]
    want = quantile_ranges(offline, 0.01, 0.5)
    assert micro.keys() == want.keys() == whole.keys() and len(want) >= 2
    for k in want:
        assert micro[k] == pytest.approx(want[k], rel=1e-6), k
        assert whole[k] == pytest.approx(want[k], rel=1e-6), k


def test_range_hooks_keep_only_the_sample(monkeypatch):
    monkeypatch.setattr(preact_range, "MAX_VALUES", 256)
    width, n, batch = 256, 12, 2
    model = _model("gpt", width)
    probe = _probe("gpt", n)
    reference_ranges([model], probe["x"], batch, "cpu")     # warm-up
    meter = RetainedAtForwardEnd(model)
    try:
        reference_ranges([model], probe["x"], batch, "cpu")
    finally:
        meter.remove()
    layers = len(model.preact_points())
    one_output = batch * 16 * width * 4                  # one micro-batch's attn_q output (fp32)
    sample = layers * 2 * 256 * 4                        # at most 2 MAX_VALUES fp32 values a layer
    print(f"ranges: retained {meter.peak} B at forward end; one micro-batch's layer output {one_output} B, "
          f"sample bound {sample} B, the whole probe's preactivations >= {layers * n * 16 * width * 4} B")
    assert meter.rows <= batch
    # the old hooks kept every preactivation of the probe: >= layers * n * T * width * 4 bytes
    assert meter.peak <= sample + one_output // 4


@pytest.mark.parametrize("arch", ["mlp", "gpt"])
def test_planner_counts_the_kernel_rows_the_hooks_keep(arch):
    """fastwidth plan's evaluation term includes exactly the rows KernelRows keeps (plus the kernels)."""
    from fastwidth.parallel.plan import count_params, kernel_rows_bytes
    from fastwidth.stats.signature import KernelRows
    width = 96
    model = _model(arch, width)
    probe = _probe(arch, 40 if arch == "mlp" else 5)
    spec = _spec(probe, 40)
    rows = KernelRows(model.feature_points())
    n_points = probe["y"].numel()
    rows.expect(n_points, spec.kernel_index)
    with torch.no_grad():
        model(probe["x"])
    rows.remove()
    kept = sum(rows.phi(k).numel() * 4 for k in rows.parts)
    kp = len(spec.kernel_index)
    sets = [f"model.arch={arch}", "model.depth=3" if arch == "mlp" else "model.depth=2", f"model.width={width}",
            "param.base_width=32", f"stats.kernel_points={kp}", "data.source=synthetic", "data.in_dim=12",
            "data.num_classes=5", f"data.probe_size={probe['x'].shape[0]}", "data.seq_len=16"]
    if arch == "gpt":
        sets += ["model.head_dim=16", "data.tokenizer=bytes"]
    cfg = load_config(None, sets)
    counts = count_params(cfg)
    assert counts["feature_layers"] == len(model.feature_points())
    assert kernel_rows_bytes(cfg, counts) == kept + 4 * len(rows.parts) * kp * kp
