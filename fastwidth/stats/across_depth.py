"""Consistency across depth: each depth against the reference depth at the same width (and lr).

    axis = DepthAxis(members, ref_depth, run_dir, writer, centers, n_boot)   # one per (lr, width)
    axis.evaluated(step, tokens)   # after an evaluation: rows for every step whose signatures are all there
    rows = depth_rows(sigs, ref_depth, centers, n_boot)   # the same, from {(depth, seed): signature}

The across-width machinery with depth in the width's place: the same signatures (saved by each
depth's Monitor, stats/monitor.py), the same pairwise metrics (monitor.compare) and the same seed
ensembles and fits (stats/ensemble.py SeedEnsembles, keyed by depth). Rows carry "axis": "depth":
- consistency: per member of a non-reference depth vs the reference depth's member of the same
  seed (else its first): ref_width (= width), ref_depth, ref_seed, true_logit_rmse,
  true_logit_rmse_vs_mean, sketch_distance, top1_agreement, loss_gap; cka / kernel_alignment
  {layer} of the layers matched by relative depth (cka_ref_layer {layer: reference layer}); and
  preact_w1 / preact_w1_std {layer} of the FINAL block's preactivation points only.
- ensemble: per depth: seed_variance V_L (and its interval from 4 seeds), bias (raw),
  bias_sq_debiased (+ _ci), true_logit_rmse (+ _ci), logit_variance.
- fit: per width ("depth": 0, across depths): rmse_slope, variance_slope, bias_slope = slopes of
  log quantity against log depth, each with `<name>_ci` (the bootstrap over seeds of the width
  fits), the bias model's fields with the depth in N's place (RMSE² = a(1/L + 1/L_ref) +
  β²(1/L − 1/L_ref)²; bias_exponent null unless a bias is identified), rmse_depths.

Matching layers by relative depth: a layer name with an index (`block3`, `block3.attn_q`,
`layer2`) belongs to the family of its text around the first number; in a family of n layers,
index i sits at relative depth (i+1)/n, the output of block i of n. It is matched with the
reference's layer j of the same family (n_ref layers) at the nearest relative depth: j =
floor((i+1)·n_ref/n + ½) − 1, kept when 0 <= j < n_ref (a layer shallower than the reference's
first block has no match). Depths 2 and 8: block0 ↔ block3, block1 ↔ block7. Layers without an
index match the same name. The final block of a family is index n−1 against n_ref−1.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from fastwidth.run import RunDir
from fastwidth.run.metrics import json_safe
from fastwidth.stats import metrics as M
from fastwidth.stats.ensemble import SeedEnsembles, output_rows
from fastwidth.stats.monitor import compare
from fastwidth.stats.signature import load_signature

_INDEXED = re.compile(r"^(\D*?)(\d+)(.*)$")
_LAYER_KEYS = ("kernel/", "preact_hist/", "preact/")


def _families(layers) -> dict[tuple[str, str], dict[int, str]]:
    """{(text before the index, text after): {index: layer}} of the indexed layer names."""
    out: dict = {}
    for name in layers:
        found = _INDEXED.match(name)
        if found:
            out.setdefault((found.group(1), found.group(3)), {})[int(found.group(2))] = name
    return out


def relative_depth_pairs(layers, ref_layers) -> dict[str, str]:
    """{layer: the reference layer at the nearest relative depth} (the module docstring's rule)."""
    ref = _families(ref_layers)
    out = {name: name for name in layers if not _INDEXED.match(name) and name in ref_layers}
    for fam, idx in _families(layers).items():
        if fam not in ref:
            continue
        n, n_ref = max(idx) + 1, max(ref[fam]) + 1
        for i, name in idx.items():
            j = math.floor((i + 1) * n_ref / n + 0.5) - 1
            if 0 <= j < n_ref and j in ref[fam]:
                out[name] = ref[fam][j]
    return out


def last_block_pairs(layers, ref_layers) -> dict[str, str]:
    """{the last layer of each indexed family: the reference's last layer of that family}."""
    ref = _families(ref_layers)
    return {idx[max(idx)]: ref[fam][max(ref[fam])] for fam, idx in _families(layers).items() if fam in ref}


def _layers(sig: dict, prefix: str) -> list[str]:
    return [k[len(prefix):] for k in sig if k.startswith(prefix)]


def compare_across_depth(sig: dict, ref: dict, ref_mean_true: torch.Tensor | None, centers) -> dict:
    """monitor.compare's metrics of `sig` against the reference-depth signature `ref`: the probe
    metrics as across width, the kernels of layers matched by relative depth, and the final
    block's preactivation W1 (histograms on each layer's own bins, centers(layer, n) in raw units:
    metrics.wasserstein1_points), over the reference layer's std for preact_w1_std."""
    plain = {k: v for k, v in sig.items() if not k.startswith(_LAYER_KEYS)}
    row = compare(plain, {k: v for k, v in ref.items() if not k.startswith(_LAYER_KEYS)}, ref_mean_true, centers)
    kernels = relative_depth_pairs(_layers(sig, "kernel/"), _layers(ref, "kernel/"))
    if kernels:
        row["cka"] = {l: M.cka(sig[f"kernel/{l}"], ref[f"kernel/{r}"]) for l, r in kernels.items()}
        row["kernel_alignment"] = {l: M.kernel_alignment(sig[f"kernel/{l}"], ref[f"kernel/{r}"])
                                   for l, r in kernels.items()}
        row["cka_ref_layer"] = kernels
    last = last_block_pairs(_layers(sig, "preact_hist/"), _layers(ref, "preact_hist/"))
    if last:
        w1, std = {}, {}
        for l, r in last.items():
            h, g = sig[f"preact_hist/{l}"], ref[f"preact_hist/{r}"]
            w1[l] = M.wasserstein1_points(h, centers(l, h.numel()), g, centers(r, g.numel()))
            sd = float(ref[f"preact/{r}"][2]) ** 0.5 if f"preact/{r}" in ref else math.nan
            std[l] = w1[l] / sd if sd > 0 else math.nan
        row.update(preact_w1=w1, preact_w1_std=std, preact_ref_layer=last)
    return row


def depth_rows(sigs: dict[tuple[int, int], dict], ref_depth: int, centers, n_boot: int) -> list[dict]:
    """The rows across depth of one width at one step from {(depth, seed): signature}, without
    step, tokens, width (the caller's): consistency rows of every non-reference member, one
    ensemble row per depth and one fit row. Needs the reference depth's signatures."""
    depths = sorted({d for d, _ in sigs})
    seeds = {d: sorted(s for dd, s in sigs if dd == d) for d in depths}
    refs = {s: sigs[(ref_depth, s)] for s in seeds[ref_depth]}
    mean_true = torch.stack([r["true_logit"].double() for r in refs.values()]).mean(0)
    rows = []
    for (d, s), sig in sorted(sigs.items()):
        if d == ref_depth:
            continue
        ref_seed = s if s in refs else min(refs)
        rows.append({"kind": "consistency", "depth": d, "seed": s, "ref": "live", "ref_depth": ref_depth,
                     "ref_seed": ref_seed, **compare_across_depth(sig, refs[ref_seed], mean_true, centers)})
    true = {d: torch.stack([sigs[(d, s)]["true_logit"] for s in seeds[d]]) for d in depths}
    est = SeedEnsembles(true, seeds, ref_depth)
    outputs, output_fits = output_rows({d: [sigs[(d, s)] for s in seeds[d]] for d in depths}, seeds, ref_depth, n_boot)
    for d, stats in est.width_rows(n_boot).items():
        row = {"kind": "ensemble", "depth": d, "seed": -1, "ref_depth": ref_depth, **stats, **outputs[d]}
        if len(seeds[d]) >= 2:
            sketch = torch.stack([sigs[(d, s)]["sketch"].double() for s in seeds[d]])
            row["logit_variance"] = float(sketch.var(0, correction=1).sum(-1).mean())
        rows.append(row)
    fit = est.fit_row(n_boot, axis="depth")
    rows.append({"kind": "fit", "depth": 0, "seed": -1, "ref_depth": ref_depth, **fit, **output_fits})
    return rows


class DepthAxis:
    """The rows across depth of one width's members (one learning rate), written once every
    member's signature of an evaluated step is on disk (lockstep: right after the evaluation;
    sequential: after the last member's). members: objects with name, depth, seed; writer: the
    group's (it adds base_lr in a learning-rate sweep); centers(layer, n): the Monitors' bins
    (one set for every depth of a sweep, stats/lr_groups.py)."""

    def __init__(self, members: list, ref_depth: int, run_dir: Path, writer, centers, n_boot: int):
        self.members, self.ref_depth, self.run = list(members), ref_depth, RunDir(run_dir)
        self.writer, self.centers, self.n_boot = writer, centers, n_boot
        self.width = self.members[0].width
        self.pending: dict[int, int] = {}   # step -> tokens, evaluated but not yet compared
        self.done: set[int] = set()
        self.lost = False                   # every reference-depth member stopped (drop)

    def evaluated(self, step: int, tokens: int) -> None:
        """Note that some member evaluated `step`; write the rows of every step now complete."""
        if step not in self.done and not self.lost:
            self.pending[step] = tokens
        for s in sorted(self.pending):
            paths = {(m.depth, m.seed): self.run.signature(m.name, s) for m in self.members}
            if not all(p.is_file() for p in paths.values()):
                continue
            tokens = self.pending.pop(s)
            self.done.add(s)
            sigs = {k: load_signature(p)[0] for k, p in paths.items()}
            for row in depth_rows(sigs, self.ref_depth, self.centers, self.n_boot):
                self.writer.write(json_safe({"step": s, "tokens": tokens, "width": self.width,
                                             "ref_width": self.width, **row, "axis": "depth"}))

    def drop(self, m) -> None:
        """Leave a stopped member out of later comparisons; with no reference-depth member left
        there is nothing to compare with (the width Monitor's "skipped" row says why)."""
        if m not in self.members:
            return
        self.members = [x for x in self.members if x is not m]
        if not any(x.depth == self.ref_depth for x in self.members):
            self.lost, self.pending = True, {}

    def state_dict(self) -> dict:
        return {"pending": {str(k): v for k, v in self.pending.items()}, "done": sorted(self.done)}

    def load_state_dict(self, d: dict) -> None:
        self.pending = {int(k): v for k, v in d.get("pending", {}).items()}
        self.done = set(d.get("done", []))
