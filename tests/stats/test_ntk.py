import pytest
import torch

from fastwidth.stats.ntk import (_loop_grads, eigh_desc, entk, grad_chunk, group_lr_weights, probe_output_fn, spectrum,
                                 task_power_by_class)
from stats_toys import ToyLM, ToyMLP, teacher_data


def _explicit_ntk(out_fn, n, params):
    rows = []
    for i in range(n):
        o = out_fn(torch.tensor([i])).sum()
        grads = torch.autograd.grad(o, params)
        rows.append(torch.cat([t.reshape(-1) for t in grads]).double())
    J = torch.stack(rows)
    return J @ J.T


@pytest.mark.parametrize("method", ["exact", "fd"])
def test_entk_matches_explicit_jacobian(method):
    x, y = teacher_data(30, d=6, classes=4)
    model = ToyMLP(6, 32, 4, seed=3)
    out = probe_output_fn(model, {"x": x, "y": y}, 11, "cpu")
    params = list(model.parameters())
    K, used = entk(out.fn, out.n, params, method=method)
    assert used == method
    want = _explicit_ntk(out.fn, out.n, params)
    tol = 1e-9 if method == "exact" else 2e-3  # fd: fp32 forward, central difference
    torch.testing.assert_close(K, want, rtol=tol, atol=tol * float(want.abs().max()))


def test_entk_auto_uses_fd_past_the_memory_cap():
    x, y = teacher_data(10)
    model = ToyMLP(6, 16, 4)
    out = probe_output_fn(model, {"x": x, "y": y}, 5, "cpu")
    assert entk(out.fn, out.n, list(model.parameters()), max_bytes=0)[1] == "fd"
    assert entk(out.fn, out.n, list(model.parameters()))[1] == "exact"


def test_token_scalar_output_is_last_position():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 9, (6, 4), generator=g), torch.randint(0, 9, (6, 4), generator=g)
    model = ToyLM(9, 8)
    out = probe_output_fn(model, {"x": x, "y": y}, 4, "cpu")
    z = model(x[:4])[:, -1]
    torch.testing.assert_close(out.fn(torch.arange(4)), z[:, out.cls] - z.mean(-1))
    assert out.cls == int(torch.bincount(y[:4, -1]).argmax())


def test_spectrum_and_task_power():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 7, generator=g, dtype=torch.float64)
    K = a @ a.T
    y = torch.randn(7, generator=g, dtype=torch.float64)
    ev, c = spectrum(K, y)
    assert torch.all(ev[:-1] >= ev[1:])
    torch.testing.assert_close(ev.sum(), K.trace())
    assert torch.all(c[1:] >= c[:-1] - 1e-12) and c[-1] == pytest.approx(1.0)
    u = torch.linalg.eigh(K)[1][:, -1]                       # top eigenvector
    assert float(c[0]) == pytest.approx(float((u @ y) ** 2 / (y @ y)))


@pytest.mark.parametrize("method", ["exact", "fd"])
def test_lr_weighted_entk_of_a_linear_model_is_x_diag_eta_xt(method):
    """f(x) = w1·x1 + w2·x2 (two parameter groups): K = X diag(η) Xᵀ, η per group or per element."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g)
    w1 = torch.randn(3, generator=g, requires_grad=True)
    w2 = torch.randn(2, generator=g, requires_grad=True)

    def fn(idx):
        return x[idx, :3] @ w1 + x[idx, 3:] @ w2

    opt = torch.optim.SGD([{"params": [w1], "lr": 0.5}, {"params": [w2], "lr": 0.02}])

    eta = group_lr_weights(opt, [w1, w2])
    assert eta == [0.5, 0.02]
    X = x.double()
    want = X @ torch.diag(torch.tensor([0.5] * 3 + [0.02] * 2, dtype=torch.float64)) @ X.T
    K, _ = entk(fn, 9, [w1, w2], method=method, weights=eta)
    tol = 1e-9 if method == "exact" else 2e-3
    torch.testing.assert_close(K, want, rtol=tol, atol=tol * float(want.abs().max()))
    d = [torch.rand(3, generator=g), torch.rand(2, generator=g)]      # per element (Adam-like)
    K, _ = entk(fn, 9, [w1, w2], method=method, weights=d)
    want = X @ torch.diag(torch.cat(d).double()) @ X.T
    torch.testing.assert_close(K, want, rtol=tol, atol=tol * float(want.abs().max()))
    raw, _ = entk(fn, 9, [w1, w2], method=method)
    torch.testing.assert_close(raw, X @ X.T, rtol=tol, atol=tol * float((X @ X.T).abs().max()))


# ---------------------------------------------------------------- batched per-point gradients

from types import SimpleNamespace  # noqa: E402

from fastwidth.config import load_config  # noqa: E402
from fastwidth.kernels import dispatch  # noqa: E402
from fastwidth.models import build_model  # noqa: E402

REAL_MODELS = {
    "mlp": (["model.arch=mlp", "model.depth=2", "model.width=24", "param.base_width=16"],
            SimpleNamespace(kind="classes", in_shape=(7,), num_classes=5)),
    "resnet": (["model.arch=resnet", "model.width=4", "param.base_width=4"],
               SimpleNamespace(kind="classes", in_shape=(3, 6, 6), num_classes=5)),
    "gpt": (["model.arch=gpt", "model.depth=2", "model.head_dim=8", "model.width=16", "param.base_width=16",
             "data.seq_len=6"], SimpleNamespace(kind="tokens", vocab_size=13, seq_len=6)),
}


def _real_model(arch, seed=0):
    """A project model in fp64 (eval mode: the ResNet's BatchNorm uses running statistics) with a
    non-zero readout, and a probe of 9 points; the running stats are perturbed so they matter."""
    sets, io = REAL_MODELS[arch]
    model, table = build_model(load_config(None, sets + ["param.zero_readout=false"]), io, seed=seed)
    model = model.double().eval()
    g = torch.Generator().manual_seed(seed)
    for name, b in model.named_buffers():
        if "running_mean" in name:
            b.copy_(0.1 * torch.randn(b.shape, generator=g, dtype=b.dtype))
        elif "running_var" in name:
            b.copy_(1 + 0.2 * torch.rand(b.shape, generator=g, dtype=b.dtype))
    if io.kind == "tokens":
        x = torch.randint(0, io.vocab_size, (9, io.seq_len), generator=g)
        y = torch.randint(0, io.vocab_size, (9, io.seq_len), generator=g)
    else:
        x = torch.randn(9, *io.in_shape, generator=g, dtype=torch.float64)
        y = torch.randint(0, io.num_classes, (9,), generator=g)
    return model, table, {"x": x, "y": y}


@pytest.mark.parametrize("arch", ["mlp", "resnet", "gpt"])
@pytest.mark.parametrize("method", ["exact", "fd"])
def test_batched_gradients_equal_the_per_point_loop(arch, method):
    model, table, probe = _real_model(arch)
    out = probe_output_fn(model, probe, 7, "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    weights = [float(torch.rand((), generator=g)) + 0.1 for _ in params]     # per-group LRs
    raw = None
    with dispatch.using("torch"):
        for w in (None, weights):
            info_v, info_l = {}, {}
            Kv, _ = entk(out.fn, out.n, params, method=method, weights=w, batched=out.batched, info=info_v,
                         max_bytes=3 * 8 * sum(p.numel() for p in params))          # fd: chunks of 3
            Kl, _ = entk(out.fn, out.n, params, method=method, weights=w, info=info_l)
            assert info_v["grads"] == "vmap" and info_l["grads"] == "loop"
            assert float(Kl.abs().max()) > 0
            torch.testing.assert_close(Kv, Kl, rtol=1e-9, atol=1e-9 * float(Kl.abs().max()))
            if w is None:
                raw = Kl
        if method == "exact":   # and the loop itself is the explicit Jacobian
            want = _explicit_ntk(out.fn, out.n, params)
            torch.testing.assert_close(raw, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


def test_batched_lr_weights_from_the_mup_optimizer():
    """The monitor's weights (the optimizer's per-group LRs) through the batched path: K = J diag(η) Jᵀ."""
    from fastwidth.param.optim import build_optimizer
    model, table, probe = _real_model("mlp")
    cfg = load_config(None, REAL_MODELS["mlp"][0] + ["optim.name=adam"])
    opt = build_optimizer(model, table, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    eta = group_lr_weights(opt, params)
    assert len(set(eta)) > 1                                   # µP: groups with different LRs
    out = probe_output_fn(model, probe, 6, "cpu")
    K, _ = entk(out.fn, out.n, params, weights=eta, batched=out.batched)
    J = torch.cat([_loop_grads(out.fn, [p], torch.arange(out.n))[:, 0] * e ** 0.5
                   for p, e in zip(params, eta)], 1).double()
    torch.testing.assert_close(K, J @ J.T, rtol=1e-9, atol=1e-9 * float((J @ J.T).abs().max()))


class _Square(torch.autograd.Function):
    """x² with a hand-written backward and no setup_context: torch.func cannot trace it."""
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _FusedToy(ToyMLP):
    def forward(self, x):
        return self.readout(_Square.apply(self.features(x)))


def test_untraceable_model_falls_back_to_the_loop():
    x, y = teacher_data(12, d=6, classes=4)
    model = _FusedToy(6, 10, 4, seed=2).double()
    out = probe_output_fn(model, {"x": x.double(), "y": y}, 8, "cpu")
    params = list(model.parameters())
    info = {}
    K, _ = entk(out.fn, out.n, params, batched=out.batched, info=info)
    assert info["grads"] == "loop"
    want = _explicit_ntk(out.fn, out.n, params)
    torch.testing.assert_close(K, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


@pytest.mark.parametrize("method", ["exact", "fd"])
def test_gradient_chunks_respect_max_bytes(method):
    x, y = teacher_data(30, d=6, classes=4)
    model = ToyMLP(6, 16, 4, seed=1).double()
    out = probe_output_fn(model, {"x": x.double(), "y": y}, 20, "cpu")
    params = list(model.parameters())
    row = 8 * sum(p.numel() for p in params)                       # one point's fp64 gradient
    max_bytes = 20 * row + 5 * row if method == "exact" else 5 * row
    seen = []

    def recording(ps, idx):
        g = out.batched(ps, idx)
        seen.append(g.numel() * g.element_size())
        return g

    info = {}
    K, used = entk(out.fn, out.n, params, max_bytes=max_bytes, method="auto", batched=recording, info=info)
    assert used == method and info["chunk"] == 5 and len(seen) == 4
    held = 20 * row if method == "exact" else 0                     # G, which exact keeps
    assert all(held + b <= max_bytes for b in seen)
    want = _explicit_ntk(out.fn, out.n, params)
    tol = 1e-9 if method == "exact" else 2e-3
    torch.testing.assert_close(K, want, rtol=tol, atol=tol * float(want.abs().max()))
    assert grad_chunk(20, row, 0) == 1 and grad_chunk(20, row, 10 ** 12) == 20


@pytest.mark.parametrize("method", ["exact", "fd"])
def test_trace_kernel_is_the_sum_over_classes(method):
    x, y = teacher_data(20, d=6, classes=4)
    model = ToyMLP(6, 12, 4, seed=4).double()
    probe = {"x": x.double(), "y": y}
    out = probe_output_fn(model, probe, 9, "cpu", output="trace")
    params = list(model.parameters())
    want = torch.zeros(9, 9, dtype=torch.float64)
    for c in range(4):
        def fc(idx, c=c):
            z = model(probe["x"][idx])
            return z[:, c] - z.mean(-1)
        want += _explicit_ntk(fc, 9, params)
    for batched in (out.batched, None):
        K, _ = entk(out.fn, out.n, params, method=method, batched=batched)
        tol = 1e-9 if method == "exact" else 2e-3
        torch.testing.assert_close(K, want, rtol=tol, atol=tol * float(want.abs().max()))
    with pytest.raises(ValueError, match="classifiers"):
        probe_output_fn(ToyLM(9, 8), {"x": torch.zeros(3, 4, dtype=torch.long),
                                      "y": torch.zeros(3, 4, dtype=torch.long)}, 3, "cpu", output="trace")


def test_task_power_by_class_is_one_vs_rest():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(8, 8, generator=g, dtype=torch.float64)
    K = a @ a.T
    labels = torch.tensor([0, 2, 2, 1, 0, 2, 1, 2])
    ev, U = eigh_desc(K)
    got = task_power_by_class(U, labels, [0, 1, 2])
    for c in (0, 1, 2):
        y = (labels == c).double()
        y = y - y.mean()
        assert got[str(c)][0] == pytest.approx(float((U[:, 0] @ y) ** 2 / (y @ y)))
        assert got[str(c)][-1] == pytest.approx(1.0)
    x, y = teacher_data(40, classes=4)
    out = probe_output_fn(ToyMLP(6, 8, 4), {"x": x, "y": y}, 30, "cpu")
    assert out.task_classes == sorted(set(y[:30].tolist()))
    ids = torch.tensor([[1, 5], [2, 5], [3, 7], [4, 7], [5, 7], [6, 3]])   # last tokens 5, 5, 7, 7, 7, 3
    lm = probe_output_fn(ToyLM(9, 8), {"x": ids, "y": ids}, 6, "cpu")
    assert lm.task_classes == [7, 5, 3] and lm.cls == 7
