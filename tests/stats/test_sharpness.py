import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fastwidth.stats.sharpness import hvp_double, hvp_fd, optimizer_preconditioner, top_hessian_eig
from stats_toys import ToyMLP, teacher_data


def _setup():
    torch.manual_seed(0)
    model = ToyMLP(3, 5, 3, depth=1, seed=2).double()
    x, y = teacher_data(20, d=3, classes=3, seed=4)
    x = x.double()
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    shapes = [p.shape for p in params]

    def loss_fn():
        return F.cross_entropy(model(x), y)

    def flat_loss(theta):
        chunks, i = {}, 0
        for n, s in zip(names, shapes):
            k = int(np.prod(s))
            chunks[n] = theta[i:i + k].reshape(s)
            i += k
        return F.cross_entropy(functional_call(model, chunks, (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in params])
    H = torch.autograd.functional.hessian(flat_loss, theta)
    return model, params, loss_fn, H


def _top(A):
    return float(torch.linalg.eigvalsh(A)[-1])


@pytest.mark.parametrize("hvp", ["double", "fd"])
def test_power_iteration_matches_exact_hessian(hvp):
    model, params, loss_fn, H = _setup()
    lam, info = top_hessian_eig(loss_fn, params, iters=500, tol=1e-10, hvp=hvp)
    assert info["hvp"] == hvp
    assert lam == pytest.approx(_top(H), rel=1e-4)


def test_hvp_fd_equals_double_and_restores_params():
    model, params, loss_fn, H = _setup()
    before = [p.detach().clone() for p in params]
    v = [torch.randn_like(p) for p in params]
    a, b = hvp_double(loss_fn, params, v), hvp_fd(loss_fn, params, v)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(p, q) for p, q in zip(params, before))  # bit-exact restore
    flat_v = torch.cat([t.reshape(-1) for t in v])
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in a]), H @ flat_v)


def test_preconditioned_eigenvalue():
    model, params, loss_fn, H = _setup()
    d = [torch.full_like(p, lr) for p, lr in zip(params, [0.5, 0.1, 2.0, 0.3])]
    lam, _ = top_hessian_eig(loss_fn, params, precond=d, iters=800, tol=1e-12, hvp="double")
    r = torch.cat([t.reshape(-1) for t in d]).sqrt()
    assert lam == pytest.approx(_top(r[:, None] * H * r[None, :]), rel=1e-4)


def test_optimizer_preconditioner():
    model = ToyMLP(3, 4, 2, depth=1)
    params = list(model.parameters())
    sgd = torch.optim.SGD([{"params": params[:2], "lr": 0.1}, {"params": params[2:], "lr": 0.4}], momentum=0.5)
    pre, thr, kind = optimizer_preconditioner(sgd, params)
    assert kind == "lr" and thr == pytest.approx(3.0)
    assert float(pre[0][0, 0]) == pytest.approx(0.1) and float(pre[3][0]) == pytest.approx(0.4)
    adam = torch.optim.Adam(params, lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    model.loss(torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])).backward()
    adam.step()
    pre, thr, kind = optimizer_preconditioner(adam, params)
    assert kind == "adam" and thr == pytest.approx(38.0)
    # after one step v̂ = g² exactly (bias-corrected), so P = lr / (|g| + eps): the closed form,
    # from the gradient itself rather than from the optimizer's state
    g = params[0].grad
    torch.testing.assert_close(pre[0], 0.01 / (g.abs() + 1e-8), rtol=1e-5, atol=0)


@pytest.mark.parametrize("hvp", ["double", "fd"])
def test_dominant_negative_eigenvalue_is_shifted_away(hvp):
    """Power iteration alone would return -5 here; the top eigenvalue is 2."""
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    A = q @ torch.diag(torch.tensor([-5.0, 1.0, 2.0, 0.5], dtype=torch.float64)) @ q.T
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    lam, info = top_hessian_eig(lambda: 0.5 * theta @ A @ theta, [theta], iters=300,
                                tol=1e-12, hvp=hvp)
    assert lam == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize("hvp", ["double", "fd"])
def test_lanczos_matches_exact_hessian_and_beats_power_iteration(hvp):
    from fastwidth.stats.sharpness import lanczos_top_eig
    model, params, loss_fn, H = _setup()
    lam, info = lanczos_top_eig(loss_fn, params, iters=40, tol=1e-8, hvp=hvp)
    assert lam == pytest.approx(_top(H), rel=1e-4 if hvp == "double" else 1e-3) and info["converged"]
    d = [torch.rand_like(p) + 0.5 for p in params]             # preconditioned: P^1/2 H P^1/2
    root = torch.cat([x.reshape(-1) for x in d]).sqrt()
    lam_p, _ = lanczos_top_eig(loss_fn, params, precond=d, iters=40, tol=1e-8, hvp=hvp)
    assert lam_p == pytest.approx(_top(root[:, None] * H * root[None, :]), rel=1e-3)
    lam_l, _ = lanczos_top_eig(loss_fn, params, iters=8, tol=0.0, hvp=hvp)
    lam_pw, _ = top_hessian_eig(loss_fn, params, iters=8, tol=0.0, hvp=hvp)
    assert abs(lam_l - _top(H)) <= abs(lam_pw - _top(H)) + 1e-9   # Krylov space contains the power iterate


def test_hvp_double_is_exact_when_the_fused_kernels_are_the_default():
    """A second backward through a fused op (here the native RMSNorm) silently drops its terms;
    hvp_double computes through the torch reference, so it equals the torch-backend HVP."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
    from native_skip import native_or_skip
    from fastwidth.kernels import dispatch
    from fastwidth.kernels.norm import rms_norm
    native_or_skip()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g)
    w = torch.randn(5, 13, generator=g).requires_grad_()
    gain = (1 + 0.1 * torch.randn(13, generator=g)).requires_grad_()
    params = [w, gain]
    v = [torch.randn(p.shape, generator=g) for p in params]

    def loss_fn():
        return (rms_norm(x @ w, gain) ** 3).sum()

    with dispatch.using("torch"):
        ref = hvp_double(loss_fn, params, v)
    with dispatch.using("native"):
        got = hvp_double(loss_fn, params, v)
        assert dispatch.get_backend() == "native"
    err = max((a - b).abs().max().item() / (a.abs().max().item() + 1e-12) for a, b in zip(got, ref))
    assert err < 1e-5, err
