"""The empirical NTK of the model's output on probe points, its eigenvalues and task power C(k).

    out = probe_output_fn(model, probe, n_points=32, device="cpu")   # f(idx) -> (len(idx),) outputs
    K, method = entk(out.fn, out.n, list(model.parameters()), max_bytes=256 << 20, batched=out.batched)
    eig, c = spectrum(K, out.target)

K_ij = ∇θ f(x_i)ᵀ D ∇θ f(x_j) with D = diag(weights): the identity gives the raw JJᵀ; the
per-group learning rates give the kernel that drives training, J·diag(η_group)·Jᵀ (under µP every
group has its own LR, so the raw kernel's composition changes with width by construction: on a
trained µP MLP its hidden-layer share grows from 9% to 65% between widths 64 and 1024 while the
LR-weighted share stays near 10%); Adam's preconditioner lr/(√v̂+ε) per element gives the
preconditioned one.

Per-point gradients are batched with torch.func (functional_call + vmap(jacrev)), a chunk of points
at a time; where vmap cannot trace the model (a custom autograd.Function of a fused kernel, a
sharded parameter) they come from one backward per point instead, the same numbers. The monitor
computes the eNTK with the torch reference kernels (kernels=torch), so vmap works for the MLP,
the ResNet (eval-mode BatchNorm) and the GPT. `max_bytes` bounds the stacked gradients, counted in
the parameters' dtype: when all P of them (G) fit, K = G D Gᵀ exactly ("exact"; the chunks fill G
in what G leaves of the budget, at least one point, and the fp64 product runs on blocks of G of the
same bytes); otherwise
each column is a directional derivative J D g_j computed by a central difference of the batched
forward (2 forwards per column, "fd"), with the gradients g_j made one budget-sized chunk at a
time, so memory stays within max_bytes whatever the width.

The output (stats.ntk_output):
- "class" (default): the scalar centered logit of one class c*, f(x) = z_c*(x) - mean_j z_j(x)
  (invariant to the softmax shift), c* the most frequent target among the NTK points so the task
  vector y_i = 1[y_i = c*] - mean is not all zeros. One kernel, one gradient per point.
- "trace": the trace kernel of the vector output, K = Σ_c K_c over every class's centered logit
  z_c - mean_j z_j (C gradients per point, C× the cost and memory of "class"). It is the kernel of
  the whole function under the squared loss, not of one output; classifiers only (a language
  model's vocabulary would make it V× the cost; the config refuses it).
Both depend only on the probe: the same for every width.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

FD_STEP = 1e-2  # h along the unit direction g_j/||g_j|| (all parameters); fp32 error ~1e-5 relative
LM_TASK_CLASSES = 10  # language models: one-vs-rest task power for this many most frequent targets


@dataclass
class ProbeOutput:
    fn: Callable[[torch.Tensor], torch.Tensor]   # point indices -> (len,) or (len, C) outputs (grad-enabled)
    n: int
    target: torch.Tensor                         # (n,) centered task vector of class `cls`
    cls: int
    labels: torch.Tensor                         # (n,) targets of the points (last token for LMs)
    task_classes: list                           # classes of the one-vs-rest task powers
    batched: Callable | None = None              # (params, idx) -> (len, m, numel) per-point gradients
    output: str = "class"


def _fp(z: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 logits up-cast; an fp64 model keeps fp64)."""
    return z if z.dtype == torch.float64 else z.float()


def probe_output_fn(model: torch.nn.Module, probe: dict, n_points: int, device, output: str = "class") -> ProbeOutput:
    """Outputs at n_points probe points: examples, or the last token of the first sequences."""
    if output not in ("class", "trace"):
        raise ValueError(f"output {output!r} is not 'class' or 'trace'")
    x, y = probe["x"], probe["y"]
    n = min(n_points, x.shape[0])
    tokens = y.dim() > 1
    if tokens and output == "trace":
        raise ValueError("the trace eNTK is for classifiers (a language model's vocabulary makes it V× the cost)")
    ys = (y[:n, -1] if tokens else y[:n]).long()                      # (n,) targets of the points
    counts = torch.bincount(ys)
    cls = int(counts.argmax())
    target = (ys == cls).double()
    target = target - target.mean()
    if tokens:   # the most frequent targets, ties to the smaller id (argsort is stable on -counts)
        order = torch.argsort(-counts, stable=True)
        task_classes = [int(c) for c in order[:LM_TASK_CLASSES] if counts[c] > 0]
    else:
        task_classes = [int(c) for c in torch.nonzero(counts).flatten()]

    def head(logits: torch.Tensor) -> torch.Tensor:
        z = _fp(logits)
        z = z[:, -1] if tokens else z                                  # (b, C)
        zc = z - z.mean(-1, keepdim=True)
        return zc[:, cls] if output == "class" else zc                 # (b,) or (b, C)

    def fn(idx: torch.Tensor) -> torch.Tensor:
        return head(model(x[idx].to(device)))

    return ProbeOutput(fn, n, target, cls, ys, task_classes, functional_grads(model, x[:n], head, device), output)


def functional_grads(model: torch.nn.Module, inputs: torch.Tensor, head: Callable, device) -> Callable:
    """(params, idx) -> (len(idx), m, numel) gradients of head(model(inputs[i])) per point, by
    torch.func: functional_call + vmap over points of jacrev over the m outputs. Parameters of the
    model not in `params` and the buffers stay fixed (eval-mode BatchNorm uses its running stats)."""
    from torch.func import functional_call, jacrev, vmap

    def grads(params: list, idx: torch.Tensor) -> torch.Tensor:
        named = dict(model.named_parameters())
        want = {id(p) for p in params}
        name_of = {id(p): n for n, p in named.items()}
        names = [name_of[id(p)] for p in params]                      # KeyError: not this model's
        fixed = {n: p.detach() for n, p in named.items() if id(p) not in want}
        buffers = dict(model.named_buffers())

        def f(ps, xi):
            z = functional_call(model, ({**fixed, **dict(zip(names, ps)), **buffers}), (xi.unsqueeze(0),))
            return head(z).reshape(-1)                                # (m,)

        xs = inputs[idx].to(device)
        with warnings.catch_warnings():   # SDPA's batching falls back to a loop on CPU: slower, exact
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            jac = vmap(jacrev(f), in_dims=(None, 0))(tuple(p.detach() for p in params), xs)
        b = len(idx)
        return torch.cat([j.reshape(b, j.shape[1], -1) for j in jac], -1)   # (b, m, numel)

    return grads


def _loop_grads(fn: Callable, params: list, idx: torch.Tensor) -> torch.Tensor:
    """The reference: one backward per point and output; (len(idx), m, numel)."""
    rows = []
    with torch.enable_grad():
        for i in idx.tolist():
            out = fn(torch.tensor([i])).reshape(-1)                   # (m,)
            per = []
            for c in range(out.numel()):
                g = torch.autograd.grad(out[c], params, allow_unused=True, retain_graph=c + 1 < out.numel())
                per.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1)
                                      for gi, p in zip(g, params)]))
            rows.append(torch.stack(per))
    return torch.stack(rows)


class PointGrads:
    """Per-point gradients in chunks: torch.func when it traces, else the per-point loop."""

    def __init__(self, fn: Callable, params: list, batched: Callable | None):
        self.fn, self.params, self.batched = fn, params, batched
        self.mode = "vmap" if batched is not None else "loop"

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.mode == "vmap":
            try:
                return self.batched(self.params, idx)
            except (RuntimeError, NotImplementedError):  # e.g. an autograd.Function without setup_context
                self.mode = "loop"
        return _loop_grads(self.fn, self.params, idx)


def grad_chunk(n: int, row_bytes: int, budget: int) -> int:
    """Points per chunk so that a chunk's stacked gradients (row_bytes each) fit in `budget` (>= 1)."""
    return max(1, min(n, budget // max(row_bytes, 1)))


def group_lr_weights(optimizer: torch.optim.Optimizer, params: list) -> list[float]:
    """Each parameter's learning rate from its optimizer param group (the diagonal of J·diag(η)·Jᵀ)."""
    lr = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
    return [lr.get(id(p), 0.0) for p in params]


def _diag(weights, params: list) -> torch.Tensor | None:
    if weights is None:
        return None
    return torch.cat([torch.as_tensor(w, dtype=torch.float64).expand(p.shape).reshape(-1)
                      for w, p in zip(weights, params)])


def entk(fn: Callable, n: int, params: list, *, max_bytes: int = 256 << 20, method: str = "auto",
         weights: list | None = None, batched: Callable | None = None, info: dict | None = None) -> tuple[torch.Tensor, str]:
    """The (n, n) float64 eNTK of fn over its n points; method "auto" | "exact" | "fd".

    fn(idx) -> (len(idx),) or (len(idx), m) outputs; with m outputs K = Σ_c J_c D J_cᵀ.
    weights: one float or one tensor shaped like its parameter per parameter (D's diagonal);
    None = the raw kernel JJᵀ. batched: (params, idx) -> (len, m, numel) per-point gradients
    (functional_grads); None = one backward per point. info (a dict) receives "grads" ("vmap" |
    "loop", the path taken) and "chunk" (points per gradient chunk).
    """
    numel = sum(p.numel() for p in params)
    with torch.no_grad():
        m = fn(torch.arange(1)).reshape(1, -1).shape[1]
    row = m * numel * (params[0].element_size() if params else 4)     # bytes of one point's gradients
    if method == "auto":
        method = "exact" if n * row <= max_bytes else "fd"
    d = _diag(weights, params)
    grads = PointGrads(fn, params, batched)
    if method == "exact":
        chunk = grad_chunk(n, row, max_bytes - n * row)
        G = torch.empty(n, m * numel, dtype=params[0].dtype if params else torch.float32)
        for s in range(0, n, chunk):
            G[s:s + chunk] = grads(torch.arange(s, min(s + chunk, n))).reshape(-1, m * numel).cpu()
        dm = None if d is None else d.repeat(m)
        K = torch.empty(n, n, dtype=torch.float64)
        pb = max(1, chunk * G.element_size() // 16)   # two fp64 blocks of pb rows = one chunk's bytes
        for a in range(0, n, pb):
            ga = G[a:a + pb].double()
            ga = ga if dm is None else ga * dm
            for b in range(0, n, pb):
                K[a:a + pb, b:b + pb] = ga @ G[b:b + pb].double().T
        K = (K + K.T) / 2
    else:
        chunk = grad_chunk(n, row, max_bytes)
        K = _fd_kernel(fn, n, params, d, grads, chunk, m)
    if info is not None:
        info.update(grads=grads.mode, chunk=chunk)
    return K, method


def _fd_kernel(fn, n, params, d, grads, chunk, m) -> torch.Tensor:
    """Columns J_c D g_{c,j} by central differences of the batched forward, summed over outputs c."""
    K = torch.zeros(n, n, dtype=torch.float64)
    idx_all = torch.arange(n)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    saved = [p.detach().clone() for p in params]  # exact restore, unlike add then sub
    for s in range(0, n, chunk):
        G = grads(torch.arange(s, min(s + chunk, n)))                # (b, m, numel)
        for jj in range(G.shape[0]):
            for c in range(m):
                g = G[jj, c] if d is None else (G[jj, c].double() * d).to(G.dtype)
                gnorm = float(torch.linalg.vector_norm(g.double()))
                if gnorm == 0:
                    continue
                step = FD_STEP / gnorm
                parts = [t.view(sh).to(p.device) for t, sh, p in zip(torch.split(g, sizes), shapes, params)]
                outs = []
                with torch.no_grad():
                    try:
                        for sign in (1.0, -1.0):
                            for p, p0, gi in zip(params, saved, parts):
                                p.copy_(p0).add_(gi, alpha=sign * step)
                            outs.append(fn(idx_all).reshape(n, -1)[:, c].double().cpu())
                    finally:
                        for p, p0 in zip(params, saved):
                            p.copy_(p0)
                K[:, s + jj] += (outs[0] - outs[1]) / (2 * FD_STEP) * gnorm   # J_c D g_{c,j}
    return (K + K.T) / 2


def eigh_desc(K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and their orthonormal eigenvectors (columns) of a symmetric K."""
    evals, evecs = torch.linalg.eigh(K.double())
    order = torch.argsort(evals, descending=True)
    return evals[order], evecs[:, order]


def task_power(evecs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """C(k) = sum_{i<=k} (u_i^T y)^2 / ||y||^2 for k = 1..n (nan when y = 0)."""
    y = target.double()
    power = (evecs.T.double() @ y) ** 2
    denom = (y * y).sum()
    return torch.cumsum(power, 0) / denom if denom > 0 else torch.full_like(power, float("nan"))


def one_vs_rest(labels: torch.Tensor, cls: int) -> torch.Tensor:
    """y_c = 1[label = c] - mean: the centered task vector of class c."""
    y = (labels == cls).double()
    return y - y.mean()


def task_power_by_class(evecs: torch.Tensor, labels: torch.Tensor, classes: list) -> dict[str, list]:
    """{str(c): C_c(k) for k = 1..n} one-vs-rest for each class c (JSON keys are strings)."""
    return {str(c): task_power(evecs, one_vs_rest(labels, c)).tolist() for c in classes}


def spectrum(K: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and C(k) = sum_{i<=k} (u_i^T y)^2 / ||y||^2 for k = 1..n."""
    evals, evecs = eigh_desc(K)
    return evals, task_power(evecs, target)
