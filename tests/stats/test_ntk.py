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
