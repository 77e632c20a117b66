"""A model's signature on the probe split: a few hundred KB that stand in for its predictions.

    spec = ProbeSpec.build(probe, signature_points=4096, kernel_points=128, sketch_dim=16, sketch_seed=0)
    sig, summary = probe_signature(model, spec, device)     # CPU tensors in storage dtypes
    save_signature(path, sig, meta)                          # safetensors (path: run/paths.py RunDir.signature)
    sig, meta = load_signature(path)

Points are probe examples (classifiers) or probe tokens (GPT: every (sequence, position)). The
stored subsets are fixed strided index sets that depend only on the probe and the config, so
they are the same for every width, seed and run. Per point: true-class logit, the centered
true-class logit z_y - mean_c z_c (free of the softmax-invariant shift of every logit), loss, entropy,
argmax, a k-dim sketch R^T (z - mean(z)) with R ~ N(0, 1/k) drawn from `sketch_seed`, so
full-logit distances survive without storing logits, and for classifiers (up to
MAX_STORED_CLASSES classes) the full logits themselves, for ensemble losses. Per feature layer: the kernel
Phi = phi phi^T / N on `kernel_points` points. Signatures are created directly in their storage
dtypes, so metrics from a live signature and from its file are bit-identical.

Beside them, at each eNTK evaluation (stats/monitor.py), the member's eNTK file (run/paths.py RunDir.ntk) holds
"kernel" (n, n) fp32, "eigenvectors" (n, k) fp32 (the top k = stats.ntk_top_k, descending),
"eigenvalues" (n,) fp64 and "labels" (n,) int64 (the points' targets), with the row's settings
(kernel, output, class, method, probe_hash) in the metadata; the report averages them over seeds.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastwidth.run.writes import writing
from fastwidth.stats.metrics import feature_kernel
from fastwidth.stats.ranks import gather_objects, rank_slice

# true logits and losses keep fp32 (RMSEs of ~1e-2 on logits of ~5 need it); the sketch, the
# entropy and the kernels are only ever averaged, so fp16 halves their bytes at no visible cost.
STORE_DTYPES = {"true_logit": torch.float32, "centered_true_logit": torch.float32, "loss": torch.float32, "entropy": torch.float16,
                "argmax": torch.int32, "sketch": torch.float16, "kernel": torch.float16, "logits": torch.float32}
# classifiers also keep their full logits (points x classes, fp32: ensemble losses need them) up
# to this many classes; language models' vocabularies would make signatures megabytes, so their
# ensemble losses are computed in the loop instead (stats/ensemble.py, lm_ensemble_curve)
MAX_STORED_CLASSES = 1024


def strided_index(n: int, k: int) -> torch.Tensor:
    """k indices spread evenly over range(n) (all of them when k >= n)."""
    if k >= n:
        return torch.arange(n)
    return torch.unique(torch.linspace(0, n - 1, k).round().long())


def probe_hash(probe: dict) -> str:
    h = hashlib.sha1()
    for key in ("x", "y"):
        t = probe[key].contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class ProbeSpec:
    x: torch.Tensor
    y: torch.Tensor
    per_example: int             # points per example: T for token streams, 1 for classifiers
    sig_index: torch.Tensor      # flat point indices stored per point
    kernel_index: torch.Tensor   # flat point indices of the feature kernels
    sketch_dim: int
    sketch_seed: int
    eval_batch: int = 256
    hash: str = ""
    _proj: dict = field(default_factory=dict)

    @classmethod
    def build(cls, probe: dict, *, signature_points: int, kernel_points: int, sketch_dim: int,
              sketch_seed: int, eval_batch: int = 256) -> "ProbeSpec":
        x, y = probe["x"], probe["y"]
        per_example = y[0].numel() if y.dim() > 1 else 1
        n = y.numel()
        return cls(x, y, per_example, strided_index(n, signature_points), strided_index(n, kernel_points),
                   sketch_dim, sketch_seed, eval_batch, probe_hash(probe))

    @property
    def n_examples(self) -> int:
        return self.x.shape[0]

    def projection(self, num_classes: int, device) -> torch.Tensor:
        """R (C, k) ~ N(0, 1/k), a pure function of (sketch_seed, C, k): the same for every model."""
        if num_classes not in self._proj:
            g = torch.Generator().manual_seed(self.sketch_seed)
            r = torch.randn(num_classes, self.sketch_dim, generator=g, dtype=torch.float32)
            self._proj[num_classes] = r / math.sqrt(self.sketch_dim)
        return self._proj[num_classes].to(device)

    def meta(self) -> dict:
        return {"probe_hash": self.hash, "probe_points": self.y.numel(), "signature_points": len(self.sig_index),
                "kernel_points": len(self.kernel_index), "sketch_dim": self.sketch_dim,
                "sketch_seed": self.sketch_seed}


def _select(index: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Positions (relative to lo) of the sorted `index` entries that fall in [lo, hi)."""
    a, b = torch.searchsorted(index, torch.tensor([lo, hi])).tolist()
    return index[a:b] - lo


def _point_stats(z: torch.Tensor, y: torch.Tensor):
    """Per-point true logit, centered true logit z_y - mean_c z_c (over every class: the full
    vocabulary of an LM), loss, entropy, argmax from logits z (M, C) and targets y (M,)."""
    lse = torch.logsumexp(z, -1)
    true = z.gather(1, y[:, None]).squeeze(1)
    p = torch.softmax(z, -1)
    entropy = lse - (p * z).sum(-1)
    return true, true - z.mean(-1), lse - true, entropy, z.argmax(-1)


def _kernel(phi: torch.Tensor) -> torch.Tensor:
    """Phi = phi phi^T / N: kernels/stats.py's Gram kernel where Triton is the backend, else torch."""
    from fastwidth.kernels import dispatch

    if dispatch.resolve(None, phi) == "triton":
        from fastwidth.kernels.stats import gram
        return gram(phi.float(), backend="triton") / phi.shape[-1]
    return feature_kernel(phi)


class KernelRows:
    """Forward hooks on the feature layers that reduce each block output on the spot to the rows
    its feature kernel needs: the kernel points of the current forward, (points, N) fp32. No whole
    (B, T, N) block output outlives its block (a reference to it kept every feature layer's
    output alive until the forward ended: at width 16384 and 256 probe sequences of 1024 tokens,
    16 GiB per layer).

        rows = KernelRows(feature_modules, to_host=False)
        rows.expect(n_points, index)    # before each forward; index None: keep nothing (padding)
        model(x)
        phi = rows.phi("block0")        # (kernel points seen so far, N)
        rows.remove()
    """

    def __init__(self, feature_modules: dict[str, torch.nn.Module], to_host: bool = False):
        self.to_host = to_host
        self.parts: dict[str, list[torch.Tensor]] = {k: [] for k in feature_modules}
        self._want: tuple[int, torch.Tensor] | None = None
        self._hooks = [m.register_forward_hook(self._hook(k)) for k, m in feature_modules.items()]

    def expect(self, n_points: int, index: torch.Tensor | None) -> None:
        """The next forward covers n_points flat points; keep the rows at `index` (None: none)."""
        self._want = None if index is None else (n_points, index)

    def _hook(self, key: str):
        def hook(_mod, _inp, out):
            if self._want is None:
                return
            out = out[0] if isinstance(out, (tuple, list)) else out
            n_points, index = self._want
            rows = out.detach().reshape(n_points, -1)[index].float()   # a copy: out itself is not kept
            self.parts[key].append(rows.cpu() if self.to_host else rows)
        return hook

    def phi(self, key: str) -> torch.Tensor | None:
        parts = self.parts[key]
        return torch.cat(parts) if parts else None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


POINT_KEYS = ("true_logit", "centered_true_logit", "loss", "entropy", "argmax", "sketch", "logits")


@torch.no_grad()
def probe_signature(model: torch.nn.Module, spec: ProbeSpec, device,
                    feature_modules: dict[str, torch.nn.Module] | None = None,
                    rank: int = 0, world: int = 1) -> tuple[dict, dict]:
    """Evaluate `model` on the probe in micro-batches of spec.eval_batch examples; return
    (signature tensors, {loss, accuracy}).

    Peak activation memory is one micro-batch's forward: logits never leave the device in full
    (each micro-batch is reduced to per-point values at once, a classifier's stored points' logits
    aside) and the feature hooks keep only the kernel points' rows of each block output
    (KernelRows). The result does not depend on eval_batch beyond fp rounding.

    With world > 1 (a process group; collective) each rank evaluates its run of ⌈n/world⌉ probe
    examples (stats/ranks.py rank_slice) and the ranks gather the per-point values, the stored
    logits and the kernel points' feature rows, so Phi = phi phi^T / N is assembled from the whole
    probe: every rank returns the signature one process would. Every rank runs the same number of
    forwards (FSDP2 / ZeRO-3 forwards are collectives), padding its slice with the first example
    when the probe does not split evenly.
    """
    feature_modules = feature_modules or {}
    n, pe = spec.n_examples, spec.per_example
    lo, hi = rank_slice(n, rank, world)
    rows = KernelRows(feature_modules, to_host=world > 1)  # gathered rows travel through the host
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {k: [] for k in POINT_KEYS}
    loss_acc = torch.zeros((), dtype=torch.float64, device=device)
    corr_acc = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for off in range(0, -(-n // world), spec.eval_batch):  # the same number of forwards on every rank
            s, e = lo + off, min(lo + off + spec.eval_batch, hi)
            if s >= e:  # padding forward: the first example, results dropped
                rows.expect(1, None)
                model(spec.x[:1].to(device))
                continue
            yb = spec.y[s:e].reshape(-1).to(device)
            rows.expect(len(yb), _select(spec.kernel_index, s * pe, e * pe).to(device))
            logits = model(spec.x[s:e].to(device)).float()
            z = logits.reshape(-1, logits.shape[-1])                 # (b * pe, C)
            true, centered, loss, ent, amax = _point_stats(z, yb)
            loss_acc += loss.double().sum()
            corr_acc += (amax == yb).sum()
            sel = _select(spec.sig_index, s * pe, e * pe).to(device)
            zs = z[sel]
            sketch = (zs - zs.mean(-1, keepdim=True)) @ spec.projection(z.shape[-1], device)
            keep = pe == 1 and z.shape[-1] <= MAX_STORED_CLASSES
            for key, v in zip(POINT_KEYS, (true[sel], centered[sel], loss[sel], ent[sel], amax[sel], sketch, zs if keep else None)):
                if v is not None:
                    parts[key].append(v.to(STORE_DTYPES[key]).cpu())
    finally:
        rows.remove()
        model.train(was_training)
    phi = {k: rows.phi(k) for k in feature_modules}
    sums = [float(loss_acc), int(corr_acc)]
    if world > 1:
        parts, phi, sums = _gather_ranks(parts, phi, sums, world)
    sig = {k: torch.cat(v) for k, v in parts.items() if v}
    for k in feature_modules:
        sig[f"kernel/{k}"] = _kernel(phi[k].to(device)).to(STORE_DTYPES["kernel"]).cpu()
    points = spec.y.numel()
    return sig, {"loss": sums[0] / points, "accuracy": sums[1] / points}


def _gather_ranks(parts: dict, phi: dict, sums: list, world: int) -> tuple[dict, dict, list]:
    """Every rank's per-point parts and kernel rows, concatenated in rank order (= probe order), and
    the loss and correct-count sums over the ranks. Collective."""
    mine = {"parts": {k: torch.cat(v) for k, v in parts.items() if v}, "phi": phi, "sums": sums}
    every = gather_objects(mine, world)
    parts = {k: [g["parts"][k] for g in every if k in g["parts"]] for k in POINT_KEYS}
    phi = {k: torch.cat([g["phi"][k] for g in every if g["phi"][k] is not None]) for k in phi}
    return parts, phi, [sum(g["sums"][i] for g in every) for i in range(2)]


def add_preacts(sig: dict, preacts: dict[str, dict]) -> dict:
    """Put PreactAccumulator results into a signature: (7,) moments and (bins,) counts per layer."""
    from fastwidth.stats.moments import MOMENT_NAMES

    for layer, r in preacts.items():
        sig[f"preact/{layer}"] = torch.tensor([r[k] for k in MOMENT_NAMES], dtype=torch.float64)
        sig[f"preact_hist/{layer}"] = torch.as_tensor(r["hist"], dtype=torch.float64)
    return sig


def save_signature(path: Path, sig: dict, meta: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with writing(path, tmp=tmp):  # a full disk: one line naming the file, no .tmp left
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sig.items()}, str(tmp),
                  metadata={"json": json.dumps(meta, sort_keys=True)})
        tmp.replace(path)  # atomic: a killed run never leaves half a signature


def load_signature(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a signature file; a file that is not one is a one-line UserError naming it."""
    from safetensors import SafetensorError

    from fastwidth.errors import UserError
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("json", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError) as e:  # ValueError: the metadata's JSON
        raise UserError(f"signature {path} is not a readable safetensors signature ({e}); remove it or "
                        f"copy it again from the run that wrote it") from None
