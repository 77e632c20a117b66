import pytest
import torch

from fastwidth.stats.ntk import entk, probe_output_fn, spectrum
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
    from fastwidth.stats.ntk import group_lr_weights
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
