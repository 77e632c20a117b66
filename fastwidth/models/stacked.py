"""S same-shaped models (the seeds and learning rates of one width) as one batched model.

    stack = Stack([m.model for m in members])       # member parameters become views of (S, ...) leaves
    losses = stack.losses(x, y)                     # (S,): one GEMM per layer serves every member
    losses.sum().backward(); stack.grads_to_members()  # each member's .grad is its slice
    ...                                             # per-member clip and optimizer step, unchanged
    stack.unstack()                                 # members own their storage again

Every member keeps its nn.Module: its parameters are views into the stacked leaves, so its
optimizer, checkpoint, probe evaluation and statistics read and write the same numbers as
before. The stacked forward replays the members' forward hooks on the preactivation points with
each member's slice (`replay_hooks`), so the in-loop preactivation moments see what the
member's own forward would have shown them.

Layouts: activations are (S, rows, C) with rows = B (MLP) or B*T (GPT); the GPT's attention runs
on (S*B, H, T, D), one kernel call for all members. The first layer's input is shared, so it is
one GEMM against all members' weights concatenated ((rows, in) @ (in, S*out)).

What stacks: the MLP and the GPT with the cross-entropy loss (and the GPT's grouped-query heads,
QK-norm, tied embeddings and z-loss: the tied matrix is the stacked embed.weight, read by both of
its uses, so its gradient sums them as the member's own). `why_not(models)` says in one line
why a set of models cannot be stacked (ResNet's batchnorm, hooks elsewhere than the
preactivation points, different multipliers); the loop then trains them one by one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastwidth.kernels.act import gelu, swiglu
from fastwidth.kernels.attention import attention
from fastwidth.kernels.norm import layer_norm, layer_norm_residual, rms_norm, rms_norm_residual
from fastwidth.kernels.readout_ce import readout_cross_entropy
from fastwidth.kernels.rope import rope
from fastwidth.models.gpt import GPT
from fastwidth.models.mlp import MLP
from fastwidth.nn import TiedReadout


def refusal(cfg) -> str | None:
    """Why no width of this run can stack, from its config alone (None when some may); the
    planner counts stacked activations where this is None."""
    if cfg.sweep.stack is False or cfg.sweep.stack == "off":
        return "sweep.stack=false"
    if cfg.sweep.mode != "lockstep":
        return "sweep.mode=sequential trains one model at a time"
    if cfg.dist.backend != "none":
        return f"dist.backend={cfg.dist.backend} wraps each member in its own engine"
    if cfg.train.compile:
        return "train.compile compiles each member's own loss"
    if cfg.train.activation_checkpointing != "none":
        return "train.activation_checkpointing recomputes each member's blocks"
    if cfg.train.loss != "ce":
        return f"train.loss={cfg.train.loss}: the stacked forward computes cross-entropy only"
    if cfg.model.arch in ("python", "hf"):
        return (f"UserModel does not stack: model.arch={cfg.model.arch} runs the user's own forward, which the "
                f"stacked ops cannot batch over seeds, so each member trains one by one")
    if cfg.model.arch not in ("mlp", "gpt"):
        return f"model.arch={cfg.model.arch} does not stack (only the MLP and the GPT do)"
    return None


def why_not(models: list[nn.Module]) -> str | None:
    """None when `models` can train as one Stack, else the reason in one line."""
    first = models[0]
    if not isinstance(first, (MLP, GPT)):
        return f"{type(first).__name__} does not stack (only the MLP and the GPT do)"
    shapes = [(n, p.shape, p.dtype, p.device) for n, p in first.named_parameters()]
    mults = [(getattr(mod, "mult", None), getattr(mod, "branch", None)) for mod in first.modules()]
    for m in models[1:]:
        if type(m) is not type(first) or [(n, p.shape, p.dtype, p.device) for n, p in m.named_parameters()] != shapes:
            return "the members' parameters differ in shape"
        if [(getattr(mod, "mult", None), getattr(mod, "branch", None)) for mod in m.modules()] != mults:
            return "the members' forward multipliers differ"
    for m in models:
        tapped = set(m.preact_points().values())
        for mod in m.modules():
            if (mod._forward_hooks or mod._forward_pre_hooks) and mod not in tapped:
                return f"a forward hook on {type(mod).__name__} outside the preactivation points"
            if mod._backward_hooks or getattr(mod, "_backward_pre_hooks", None):
                return f"a backward hook on {type(mod).__name__}"
    return None


# --------------------------------------------------------------------------- stacked ops

def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, mult: float) -> torch.Tensor:
    """MuLinear for every member: y = mult · (x wᵀ) + b. x (rows, in) shared by all members or
    (S, rows, in); w (S, out, in); b (S, out) or None. Returns (S, rows, out)."""
    S, out, inn = w.shape
    w = w.to(x.dtype)
    if x.dim() == 2:  # the shared input: one GEMM against the members' weights side by side
        wt = w.reshape(S * out, inn).t()  # (in, S*out)
        if b is not None:
            y = torch.addmm(b.to(x.dtype).reshape(S * out), x, wt, alpha=mult)
        else:
            y = torch.mm(x, wt)
            y = y * mult if mult != 1.0 else y
        return y.view(x.shape[0], S, out).transpose(0, 1)  # (S, rows, out), strided
    if b is not None:
        return torch.baddbmm(b.to(x.dtype).unsqueeze(1), x, w.transpose(1, 2), alpha=mult)
    y = torch.bmm(x, w.transpose(1, 2))
    return y * mult if mult != 1.0 else y


def _per_member(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(S, C) gains or shifts shaped to broadcast against (S, ..., C) activations."""
    return t.view(t.shape[0], *([1] * (like.dim() - 2)), t.shape[-1]).to(like.dtype)


def norm(mod, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, residual=None):
    """The GPT's Norm (and with_residual) for every member: the normalization runs once over all
    members' rows (the kernel without gain), the members' gains and shifts broadcast after it,
    as the torch reference applies them. Returns y, or (y, s) with a residual."""
    if mod.kind == "rms":
        if residual is None:
            y = rms_norm(x, None, mod.eps)
        else:
            y, s, _ = rms_norm_residual(x, residual, None, mod.eps)
        y = y * _per_member(w, y)
    else:
        if residual is None:
            y = layer_norm(x, None, None, mod.eps)
        else:
            y, s, _ = layer_norm_residual(x, residual, None, None, mod.eps)
        y = y * _per_member(w, y) + _per_member(b, y)
    return y if residual is None else (y, s)


# Above this many logits per member (rows x vocabulary) each member's loss is its own fused readout
# call, below it one batched F.cross_entropy over (S, rows, V) logits. Measured on 2 loaded CPU cores,
# stacked steps over the members one by one (bench/test_bench_stacked.py's alternation): demo GPT
# (1024 x 256 logits) fused 1.32x / 1.12x at widths 16 / 32 vs batched 0.99x / 0.98x (the fp32
# logits, their multiplier, softmax and zero-filled gradient were 30% of the step); µP MLP (64 x
# 10) batched 3.5x / 3.1x / 2.2x at widths 64 / 128 / 256 vs fused 2.2x / 2.1x / 1.7x (S calls'
# overhead on tiny logits). The threshold lies between the two measured sizes.
FUSED_READOUT_MIN_LOGITS = 1 << 16


def cross_entropy(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, mult: float, y: torch.Tensor,
                  z_loss: float = 0.0) -> torch.Tensor:
    """Each member's mean cross-entropy of logits = mult · h wᵀ + b, plus z_loss × the mean of
    logsumexp(logits)² (WidthModel.loss). h (S, rows, N); y (rows,). Returns (S,). Logits in
    fp32, as the fused readout computes them."""
    S, rows = h.shape[0], h.shape[1]
    y = y.reshape(-1)
    if rows * w.shape[1] >= FUSED_READOUT_MIN_LOGITS:  # the member's own loss, never holding (S, rows, V)
        return torch.stack([readout_cross_entropy(h[i], w[i], y, multiplier=mult, bias=None if b is None else b[i],
                                                  z_loss=z_loss) for i in range(S)])
    logits = linear(h, w, b, mult).float().reshape(S * rows, -1)  # (S*rows, V)
    per_row = F.cross_entropy(logits, y.repeat(S), reduction="none")
    if z_loss:
        per_row = per_row + z_loss * torch.logsumexp(logits, dim=-1).square()
    return per_row.view(S, rows).mean(1)


# --------------------------------------------------------------------------- the stack

class Stack:
    """The parameters of S same-shaped models as (S, ...) leaf tensors; each model's parameters
    are views of its slice (optimizer state, names and checkpoints stay per model)."""

    def __init__(self, models: list[nn.Module]):
        reason = why_not(models)
        if reason is not None:
            raise ValueError(f"cannot stack these models: {reason}")
        self.models = models
        self.template = models[0]  # structure, multipliers, eps, RoPE tables: shared by all
        self.names = [n for n, _ in self.template.named_parameters()]
        self.member_params = [dict(m.named_parameters()) for m in models]
        self.params: dict[str, torch.Tensor] = {}
        for n in self.names:
            ps = [mp[n] for mp in self.member_params]
            stacked = torch.stack([p.detach() for p in ps]).requires_grad_(True)  # (S, *shape)
            for i, p in enumerate(ps):
                p.data = stacked.data[i]  # the member's parameter is now a view of its slice
            self.params[n] = stacked
        self.tap_paths = {path for path, mod in self.template.named_modules()
                          if mod in set(self.template.preact_points().values())}
        self.taps: list[tuple[str, torch.Tensor, tuple]] = []  # (module path, (S, rows, C), member's leading shape)
        self.tapping = False
        self._lead: tuple = ()

    def __len__(self) -> int:
        return len(self.models)

    def unstack(self) -> None:
        """Give every member its own storage again (the stack is not used after this)."""
        for mp in self.member_params:
            for p in mp.values():
                p.data = p.data.clone()
        self.params = {}

    def grads_to_members(self) -> None:
        """Each member's .grad becomes its slice of the stacked gradient; the stack's are cleared."""
        for n, stacked in self.params.items():
            g = stacked.grad
            for i, mp in enumerate(self.member_params):
                mp[n].grad = None if g is None else g[i]
            stacked.grad = None

    def _tap(self, path: str, out: torch.Tensor) -> None:
        if self.tapping and path in self.tap_paths:
            self.taps.append((path, out.detach(), self._lead))

    def replay_hooks(self, i: int) -> None:
        """Call member i's forward hooks on its preactivation points with its slices of the
        outputs recorded since the last `clear_taps` (every micro-batch of the step)."""
        model = self.models[i]
        for path, out, lead in self.taps:
            mod = model.get_submodule(path)
            out_i = out[i].reshape(*lead, out.shape[-1])  # the shape the member's own layer returns
            for hook in list(mod._forward_hooks.values()):
                hook(mod, (), out_i)

    def clear_taps(self) -> None:
        self.taps = []

    # ------------------------------------------------------------------ forwards

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(S,): every member's mean cross-entropy on the shared batch (x, y)."""
        h = self._mlp(x) if isinstance(self.template, MLP) else self._gpt(x)
        t = self.template
        w = self.params["embed.weight" if isinstance(t.readout, TiedReadout) else "readout.weight"]
        return cross_entropy(h, w, self.params.get("readout.bias"), t.readout.mult, y, t.z_loss)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        P, t = self.params, self.template
        h = x.reshape(x.shape[0], -1)  # (B, in_dim), shared
        self._lead = (x.shape[0],)
        for i, (lin, act) in enumerate(zip(t.layers, t.acts)):
            h = linear(h, P[f"layers.{i}.weight"], P.get(f"layers.{i}.bias"), lin.mult)  # (S, B, width)
            self._tap(f"layers.{i}", h)
            h = act(h)
        return h  # (S, B, width)

    def _lin(self, path: str, mod, x: torch.Tensor) -> torch.Tensor:
        b = self.params.get(f"{path}.bias")
        if mod.branch != 1.0 and b is not None:  # a branch's last layer: MuLinear's fold, bias × branch too
            b = b * mod.branch
        out = linear(x, self.params[f"{path}.weight"], b, mod.mult * mod.branch)
        self._tap(path, out)
        return out

    def _norm(self, path: str, mod, x: torch.Tensor, residual=None):
        return norm(mod, x, self.params[f"{path}.weight"], self.params.get(f"{path}.bias"), residual)

    def _gpt(self, idx: torch.Tensor) -> torch.Tensor:
        P, t = self.params, self.template
        B, T = idx.shape
        if T > t.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's {t.seq_len}")
        S = len(self)
        self._lead = (B, T)
        w = P["embed.weight"]  # (S, V, N)
        # one F.embedding over the members' tables side by side, (V, S*N): its backward sums each
        # token's rows in the order the member's own embedding does (indexing's would not)
        table = w.transpose(0, 1).reshape(w.shape[1], S * w.shape[2])
        x = F.embedding(idx.reshape(-1), table).view(B * T, S, -1).transpose(0, 1)  # (S, B*T, N)
        x = x * t.embed.mult if t.embed.mult != 1.0 else x
        cos, sin = t.rope_cos, t.rope_sin
        for j, blk in enumerate(t.blocks):
            pre = f"blocks.{j}"
            a = blk.attn
            h = self._norm(f"{pre}.norm1", blk.norm1, x)
            H, D = a.n_heads, a.head_dim

            def heads(z, norm_path=None, norm_mod=None):  # (S, B*T, Hz*D) -> (S*B, Hz, T, D)
                if norm_mod is not None:  # QK-norm over head_dim, each member's gain: (S, B*T*Hz, D)
                    z = self._norm(norm_path, norm_mod, z.reshape(S, -1, D))
                return z.reshape(S * B, T, -1, D).transpose(1, 2)
            q = heads(self._lin(f"{pre}.attn.q", a.q, h), f"{pre}.attn.q_norm", a.q_norm)
            k = heads(self._lin(f"{pre}.attn.k", a.k, h), f"{pre}.attn.k_norm", a.k_norm)  # (S*B, Hkv, T, D)
            v = heads(self._lin(f"{pre}.attn.v", a.v, h))
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            o = attention(q, k, v, scale=a.scale, causal=True)  # (S*B, H, T, D)
            o = self._lin(f"{pre}.attn.o", a.o, o.transpose(1, 2).reshape(S, B * T, H * D))
            hn, x = self._norm(f"{pre}.norm2", blk.norm2, o, residual=x)  # o and f carry × branch (_lin)
            ff = blk.mlp
            u = self._lin(f"{pre}.mlp.fc", ff.fc, hn)  # (S, B*T, hidden)
            g = swiglu(self._lin(f"{pre}.mlp.gate", ff.gate, hn), u) if ff.gate is not None else gelu(u)
            f = self._lin(f"{pre}.mlp.proj", ff.proj, g)
            x = x + f
        return self._norm("norm_f", t.norm_f, x)  # (S, B*T, N)
