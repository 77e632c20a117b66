"""The loop's one handle on the statistics: hooks while training, signatures and rows at evals.

    monitor = Monitor(cfg, run_dir, members, probe, writer, device, rank=r, world=w)
    monitor.sync_ranges()                    # at start-up: rank 0's histogram bins on every rank
    with monitor.training(member):          # around each member's training forward (+ backward)
        loss = member.model.loss(x, y)
    monitor.sync_preacts()                   # before an evaluation or a checkpoint: the global batch's
    monitor.evaluate(step, tokens)           # at the steps of stats/schedule.py (stats.schedule)
    monitor.flush_pending()                  # sequential sweeps: after each member's run
    ckpt["stats"] = monitor.state_dict()     # and monitor.load_state_dict(...) on resume

One learning rate (and depth) per Monitor: with sweep.lrs or sweep.depths, stats/lr_groups.py's
LRMonitors holds one per learning rate and depth behind the same interface (monitor_for builds
either), and stats/across_depth.py compares the depths at each width.

Rows written (docs/design.md §5; every row has kind, step, tokens, width, seed; seed -1 means "over
seeds", width 0 "across widths"):
- eval:        per member: probe_loss, probe_acc, preact {layer: moments of the training batches,
               and out_of_range, the share outside the layer's saved bins (stats/preact_range.py:
               asinh units by default)}
- consistency: per member vs the reference width (ref "live"; same seed, else the first) and vs a
               stored run (ref "run"): ref_width, ref_seed, true_logit_rmse, true_logit_rmse_vs_mean
               (vs the mean over the reference seeds), sketch_distance, top1_agreement, loss_gap,
               cka / kernel_alignment / preact_w1 {layer} (raw units) and preact_w1_std {layer}
               (W1 / the reference member's preactivation std at that eval)
- ensemble:    per width: n_seeds, params, bias ||f̄_N - f̄_ref|| (raw), and with >= 2 seeds
               seed_variance V_N, seed_std, logit_variance (sketch), bias_sq_debiased
               (b̂² - V_N/S_N - V_ref/S_ref) with its bootstrap interval, and the averaged-logit
               ensembles of E = 1..S members: ensemble_loss, ensemble_acc, ensemble_loss_inf/_c
               (L(E) = L∞ + c/E; LMs at stats.ensemble_every, computed in the loop)
- fit:         per eval step: rmse_slope, variance_slope, bias_slope (raw), rmse2_a, the bias model's
               bias_beta_sq and bias_exponent (RMSE² = a(1/N + 1/N_ref) + β²(1/N - 1/N_ref)²; the
               exponent null with bias_exponent_reason unless a bias is identified), each with `<name>_ci`
- sharpness:   per member at stats.sharpness_every, on the training batch of the step just taken
               (stats/sharpness.py train_batch_sharpness, the batch_sharpness rows' procedure):
               precond_sharpness, lr_sharpness, threshold, batch "train", batch_step,
               batch_examples, batch_loss, iters, converged, residual
- ntk:         per member at stats.ntk_every: eigenvalues, task_power C(k) of class ntk_class,
               task_power_by_class {c: C_c(k)} one-vs-rest, trace, method, kernel, output, grads
               ("vmap" | "loop"); the kernel and its top stats.ntk_top_k eigenvectors go to
               signatures/<member>/ntk_step_<step>.safetensors (run/paths.py RunDir.ntk)
Every metric is computed from signatures (the live one and a stored one are the same numbers),
so a reference-run comparison equals the live one when the models match.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import numpy as np
import torch

from fastwidth.errors import UserError
from fastwidth.run import MemberSpec, RunDir
from fastwidth.run.metrics import json_safe
from fastwidth.stats import metrics as M
from fastwidth.stats.ensemble import EnsembleCurve, SeedEnsembles, lm_ensemble_curve, output_rows
from fastwidth.stats.moments import PreactAccumulator
from fastwidth.stats.monitor_curvature import CurvatureRows
from fastwidth.stats.preact_range import Bins, load_ranges, out_of_range_fraction, reference_ranges, save_ranges
from fastwidth.stats.ranks import broadcast_from_main, merge_over_ranks, whole_member
from fastwidth.stats.reference import read_reference_config, reference_signatures
from fastwidth.stats.signature import ProbeSpec, add_preacts, load_signature, probe_signature, save_signature

log = logging.getLogger("fastwidth.stats")


def param_count(member) -> int:
    """Parameters of one model (global shapes from its µP table when it has one: sharded models)."""
    if member.table:
        return int(sum(math.prod(info.shape) for info in member.table.values()))
    return int(sum(p.numel() for p in member.model.parameters()))


def preact_w1(sig: dict, ref: dict, layers: list[str], centers) -> dict:
    """preact_w1 {layer}: W1 between the two histograms (the same bins), bins as point masses at
    centers(layer, n) in raw units; preact_w1_std: the same over the reference member's std of
    that layer's training-batch preactivations (MOMENT_NAMES[2] = var), so layers and evaluations
    read on one scale. Binned W1 of two sampled histograms is biased up by their sampling noise;
    the report shows the same-width floor beside it."""
    w1 = {l: M.wasserstein1_binned(sig[f"preact_hist/{l}"], ref[f"preact_hist/{l}"],
                                   centers(l, sig[f"preact_hist/{l}"].numel())) for l in layers}
    std = {l: float(ref[f"preact/{l}"][2]) ** 0.5 if f"preact/{l}" in ref else math.nan for l in layers}
    return {"preact_w1": w1, "preact_w1_std": {l: w1[l] / std[l] if std[l] > 0 else math.nan for l in layers}}


def compare(sig: dict, ref: dict, ref_mean_true: torch.Tensor | None, centers) -> dict:
    """Every pairwise consistency metric of signature `sig` against signature `ref`;
    centers(layer, n) -> raw-unit centers of that layer's n histogram bins (the same for both)."""
    row = {"true_logit_rmse": M.true_logit_rmse(sig["true_logit"], ref["true_logit"]),
           "sketch_distance": M.sketch_distance(sig["sketch"], ref["sketch"]),
           "top1_agreement": M.top1_agreement(sig["argmax"], ref["argmax"]),
           "loss_gap": M.loss_gap(sig["loss"], ref["loss"])}
    if ref_mean_true is not None:
        row["true_logit_rmse_vs_mean"] = M.true_logit_rmse(sig["true_logit"], ref_mean_true)
    layers = [k.split("/", 1)[1] for k in sig if k.startswith("kernel/") and k in ref]
    if layers:
        row["cka"] = {l: M.cka(sig[f"kernel/{l}"], ref[f"kernel/{l}"]) for l in layers}
        row["kernel_alignment"] = {l: M.kernel_alignment(sig[f"kernel/{l}"], ref[f"kernel/{l}"]) for l in layers}
    hists = [k.split("/", 1)[1] for k in sig if k.startswith("preact_hist/") and k in ref]
    if hists:
        row.update(preact_w1(sig, ref, hists, centers))
    return row


class ReferenceRun:
    """Signatures of a stored run at its reference width, loaded by step."""

    def __init__(self, path: str, spec_meta: dict):
        self.path = Path(path)
        self.width, self.sigs = reference_signatures(self.path, read_reference_config(self.path))
        _, meta = load_signature(next(iter(next(iter(self.sigs.values())).values())))
        for key, want in spec_meta.items():
            if meta.get(key) != want:
                raise UserError(f"stats.reference_run {self.path} has {key}={meta.get(key)!r}, this run "
                                f"{want!r}; compare runs with the same probe and stats settings")
        self._cache: tuple[int, dict] | None = None

    def at(self, step: int) -> dict[int, dict] | None:
        """{seed: signature} at `step`, or None when the reference run did not evaluate it."""
        if self._cache and self._cache[0] == step:
            return self._cache[1]
        found = {MemberSpec.parse(n).seed: steps[step] for n, steps in self.sigs.items() if step in steps}
        out = {s: load_signature(p)[0] for s, p in sorted(found.items())} or None
        self._cache = (step, out)
        return out


class Monitor(CurvatureRows):  # sharpness() and ntk(): stats/monitor_curvature.py
    def __init__(self, cfg, run_dir: Path, members: list, probe: dict, writer, device,
                 ranges_dir: Path | None = None, train_batch=None, rank: int = 0, world: int = 1,
                 whole_of=whole_member, train_subset: dict | None = None):
        # The probe runs in fp32 whatever the training precision: bf16 logits (error ~0.02 at
        # |z|~5) would swamp RMSEs of a few hundredths.
        # ranges_dir: where this run's preact_ranges.json lives (default run_dir); a distributed
        # run's other ranks write into a scratch run_dir, emptied at each start, and read the run's.
        # train_batch(step) -> (x, y), this rank's share of the training batch of `step` (the stream is
        # a pure function of the step): sharpness rows use the batch the member trained on.
        # rank, world: this process in the data-parallel group; the probe is split over the ranks
        # (stats/signature.py probe_signature) and the preactivation summaries merged (sync_preacts).
        # whole_of(member) -> a context giving the member with whole parameters and a torch optimizer
        # over them (sharpness, eNTK); by default stats/ranks.py whole_member, its engine's gathered
        # view (a replica of one member under FSDP2 / ZeRO-3).
        # train_subset: {"x", "y"} of data.train_size's first examples (the stream gives them), evaluated
        # like the probe (probe_signature, split over the ranks) into train_subset_loss / _acc.
        self.cfg, self.sc = cfg, cfg.stats
        self.train_batch, self.rank, self.world, self.whole_of = train_batch, rank, world, whole_of
        self.run_dir, self.members, self.writer, self.device = Path(run_dir), members, writer, device
        sc = self.sc
        self.spec = ProbeSpec.build(probe, signature_points=sc.signature_points, kernel_points=sc.kernel_points,
                                    sketch_dim=sc.sketch_dim, sketch_seed=sc.sketch_seed, eval_batch=sc.eval_batch)
        self.probe = probe
        self.subset_spec = None if train_subset is None else ProbeSpec.build(
            train_subset, signature_points=0, kernel_points=0, sketch_dim=sc.sketch_dim,
            sketch_seed=sc.sketch_seed, eval_batch=sc.eval_batch)
        self.ref_width = cfg.sweep.reference_width or max(m.width for m in members)
        self.by_name = {m.name: m for m in members}
        # histogram bins per layer: ±hist_range, or (hist_range 0) the reference width's quantile
        # ranges from this run's (resume) or the reference run's file, else set at the first eval
        own = load_ranges(Path(ranges_dir) if ranges_dir is not None else self.run_dir)
        self.ranges = None if sc.hist_range > 0 else (
            own or (load_ranges(Path(sc.reference_run)) if sc.reference_run else None))
        if sc.hist_range <= 0 and sc.reference_run and self.ranges is None and sc.preact:
            raise UserError(f"stats.reference_run {sc.reference_run} has no preactivation ranges (it used a fixed "
                            f"stats.hist_range); set stats.hist_range to the value it used")
        if self.ranges is not None and load_ranges(self.run_dir) is None:
            save_ranges(self.run_dir, self.ranges)           # the reference run's bins, kept with this run
        self.acc: dict[str, dict[str, PreactAccumulator]] = {m.name: {} for m in members}
        if sc.hist_range > 0 or self.ranges is not None:
            self._make_accumulators()
        self.calls = {m.name: 0 for m in members}
        self._active: str | None = None
        self._hooks = [mod.register_forward_hook(self._hook(m.name, layer))
                       for m in members for layer, mod in (m.model.preact_points() if sc.preact else {}).items()]
        self.pending: list[tuple[str, int, int]] = []   # (member, step, tokens) awaiting the reference
        self.reference_lost = False                      # every reference-width member stopped (drop)
        self._cache: dict[tuple[str, int], dict] = {}
        self._ensembled: set[int] = set()
        self._lm_curves: dict[tuple[int, int], dict] = {}   # (width, step) -> LM ensemble curve
        self.reference = ReferenceRun(sc.reference_run, self._meta_keys()) if sc.reference_run else None

    def _meta_keys(self) -> dict:
        if self.sc.hist_range > 0:
            return {**self.spec.meta(), "hist_lo": -self.sc.hist_range, "hist_hi": self.sc.hist_range,
                    "hist_bins": self.sc.hist_bins}
        return {**self.spec.meta(), "hist_bins": self.sc.hist_bins, "hist_ranges": self.ranges}

    def _make_accumulators(self) -> None:
        sc = self.sc
        for m in self.members:
            for layer in (m.model.preact_points() if sc.preact else {}):
                lo, hi, bins = self.hist_bounds(layer)
                self.acc[m.name][layer] = PreactAccumulator(bins, lo, hi, sc.hist_stride, self.bins(layer).asinh)

    def bins(self, layer: str) -> Bins:
        """`layer`'s histogram body: the fixed ±hist_range, or the saved per-layer bins."""
        r = self.sc.hist_range
        return Bins("raw", -r, r) if r > 0 else Bins.of(self.ranges[layer])

    def hist_bounds(self, layer: str) -> tuple[float, float, int]:
        """(lo, hi, bins) of `layer`'s histogram as stored, in binned units (with the overflow bins
        in auto mode)."""
        if self.sc.hist_range > 0:
            return -self.sc.hist_range, self.sc.hist_range, self.sc.hist_bins
        return self.bins(layer).accumulator(self.sc.hist_bins)

    def hist_centers(self, layer: str, n: int):
        """Raw-unit centers of `layer`'s n stored bins (where W1 puts each bin's mass)."""
        if self.sc.hist_range > 0:
            edges = np.linspace(-self.sc.hist_range, self.sc.hist_range, n + 1)
            return (edges[:-1] + edges[1:]) / 2
        return self.bins(layer).centers(n)

    def _set_ranges(self, members: list) -> None:
        """First evaluation, hist_range 0: the reference width's seeds' bins (preact_range.py)."""
        refs = [m for m in members if m.width == self.ref_width] or \
            [m for m in members if m.width == max(x.width for x in members)]
        sc = self.sc
        self.ranges = reference_ranges([m.model for m in refs], self.probe["x"], sc.eval_batch, self.device,
                                       sc.hist_quantile, sc.hist_margin, sc.hist_units, sc.hist_reach) if sc.preact else {}
        save_ranges(self.run_dir, self.ranges)
        self._make_accumulators()

    # ------------------------------------------------------------------ training hooks

    def _hook(self, name: str, layer: str):
        accs = self.acc[name]

        def hook(_mod, _inp, out):
            if self._active == name and layer in accs:
                accs[layer].update(out[0] if isinstance(out, (tuple, list)) else out)
        return hook

    @contextlib.contextmanager
    def training(self, member):
        """Accumulate `member`'s preactivations during the wrapped forward (every preact_every-th call)."""
        k = self.calls[member.name]
        self.calls[member.name] = k + 1
        self._active = member.name if k % self.sc.preact_every == 0 else None
        try:
            yield
        finally:
            self._active = None

    @contextlib.contextmanager
    def paused(self):
        """No accumulation inside (backward passes: activation checkpointing recomputes forwards)."""
        active, self._active = self._active, None
        try:
            yield
        finally:
            self._active = active

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ evaluation

    def _due(self, step: int, every: int) -> bool:
        return step == self.cfg.train.steps or (every > 0 and step % every == 0)

    def evaluate(self, step: int, tokens: int, members: list | None = None) -> None:
        """Signatures and eval rows for `members` (default: all), then every comparison now possible."""
        if self.ranges is None and self.sc.hist_range <= 0:
            self._set_ranges(members if members is not None else self.members)
        for m in members if members is not None else self.members:
            feats = m.model.feature_points() if self.sc.kernel_points else {}
            sig, summary = probe_signature(m.model, self.spec, self.device, feats, self.rank, self.world)
            pre = {layer: a.result() for layer, a in self.acc[m.name].items()}
            for a in self.acc[m.name].values():
                a.reset()
            add_preacts(sig, pre)
            meta = {"step": step, "tokens": tokens, "width": m.width, "seed": m.seed, "name": m.name,
                    **self._meta_keys()}
            save_signature(RunDir(self.run_dir).signature(m.name, step), sig, meta)
            self._cache[(m.name, step)] = sig
            base = {"step": step, "tokens": tokens, "width": m.width, "seed": m.seed}
            moments = {l: {**{k: r[k] for k in ("mean", "var", "skew", "kurt", "min", "max")},
                           **({"out_of_range": out_of_range_fraction(r["hist"])} if self.sc.hist_range <= 0 else {})}
                       for l, r in pre.items() if r["count"] > 0}
            self.write({"kind": "eval", **base, "probe_loss": summary["loss"], "probe_acc": summary["accuracy"],
                        **self._train_subset_fields(m), **({"preact": moments} if moments else {})})
            if self.sc.sharpness_iters and self._due(step, self.sc.sharpness_every):
                with self.whole_of(m) as whole:
                    self.write({"kind": "sharpness", **base, **self.sharpness(whole, step)})
            if self.sc.ntk_points and self._due(step, self.sc.ntk_every):
                with self.whole_of(m) as whole:
                    self.write({"kind": "ntk", **base, **self.ntk(whole, {**base, "name": m.name})})
            if self.reference is not None:
                self._against_run(m, sig, base)
            if not self.reference_lost:
                self.pending.append((m.name, step, tokens))
        self._lm_ensembles(step, members if members is not None else self.members)
        self.flush_pending()

    def _train_subset_fields(self, m) -> dict:
        """data.train_size: the loss and accuracy on the subset's first examples, the probe's evaluator."""
        if self.subset_spec is None:
            return {}
        _, s = probe_signature(m.model, self.subset_spec, self.device, None, self.rank, self.world)
        return {"train_subset_loss": s["loss"], "train_subset_acc": s["accuracy"]}

    def write(self, row: dict) -> None:
        self.writer.write(json_safe(row))

    def _sig(self, name: str, step: int) -> dict | None:
        if (name, step) in self._cache:
            return self._cache[(name, step)]
        path = RunDir(self.run_dir).signature(name, step)
        return load_signature(path)[0] if path.is_file() else None

    def drop(self, m, announce: bool = True) -> None:
        """Leave a stopped (diverged) member out of every later comparison. When it was the last
        member at the reference width, nothing can be compared from then on: the comparisons
        waiting for its signatures are dropped and one "skipped" row says why (announce). A member
        this Monitor does not hold is ignored."""
        if m not in self.members:
            return
        self.members = [x for x in self.members if x is not m]
        if m.width != self.ref_width or any(x.width == self.ref_width for x in self.members):
            return
        self.reference_lost = True
        self.pending = []
        if announce:
            self.write({"kind": "skipped", "step": m.step, "tokens": 0, "width": 0, "seed": 0,
                        "stat": "consistency", "reason": f"every member at the reference width {self.ref_width} "
                        f"was stopped (diverged by step {m.step}): no consistency, ensemble or fit rows from here on"})

    def _ref_sigs(self, step: int) -> dict[int, dict] | None:
        refs = {m.seed: self._sig(m.name, step) for m in self.members if m.width == self.ref_width}
        return None if not refs or any(s is None for s in refs.values()) else refs

    def flush_pending(self) -> None:
        """Write consistency rows for evaluated members whose reference signatures now exist."""
        waiting = []
        for name, step, tokens in self.pending:
            refs = self._ref_sigs(step)
            if refs is None:
                waiting.append((name, step, tokens))
                continue
            m = self.by_name[name]
            if m.width != self.ref_width:
                self._consistency(m, self._sig(name, step), refs, step, tokens, "live", self.ref_width)
            self._ensemble(step, tokens)
        self.pending = waiting
        live = {s for _, s, _ in self.pending}
        self._cache = {k: v for k, v in self._cache.items() if k[1] in live}

    def _consistency(self, m, sig, refs: dict[int, dict], step, tokens, kind: str, ref_width: int, extra=None):
        ref_seed = m.seed if m.seed in refs else min(refs)
        mean_true = torch.stack([r["true_logit"].double() for r in refs.values()]).mean(0)
        row = {"kind": "consistency", "step": step, "tokens": tokens, "width": m.width, "seed": m.seed,
               "ref": kind, "ref_width": ref_width, "ref_seed": ref_seed, **(extra or {}),
               **compare(sig, refs[ref_seed], mean_true, self.hist_centers)}
        self.write(row)

    def _against_run(self, m, sig: dict, base: dict) -> None:
        refs = self.reference.at(base["step"])
        if refs is None:
            log.warning("stats.reference_run %s has no signatures at step %d", self.reference.path, base["step"])
            return
        self._consistency(m, sig, refs, base["step"], base["tokens"], "run", self.reference.width,
                          {"ref_run": str(self.reference.path)})

    def _ensemble(self, step: int, tokens: int) -> None:
        """Ensemble and fit rows once every member has a signature at `step` (stats/ensemble.py)."""
        if step in self._ensembled:
            return
        sigs = {m.name: self._sig(m.name, step) for m in self.members}
        if any(s is None for s in sigs.values()):
            return
        self._ensembled.add(step)
        by_width = {w: [m for m in self.members if m.width == w] for w in sorted({m.width for m in self.members})}
        if self.ref_width not in by_width:
            return
        true = {w: torch.stack([sigs[m.name]["true_logit"] for m in ms]) for w, ms in by_width.items()}
        est = SeedEnsembles(true, {w: [m.seed for m in ms] for w, ms in by_width.items()}, self.ref_width)
        per_width = est.width_rows(self.sc.bootstrap)
        # the same statistics of the centered true logit and log p_y (_centered, _logp fields)
        outputs, output_fits = output_rows({w: [sigs[m.name] for m in ms] for w, ms in by_width.items()},
                                           {w: [m.seed for m in ms] for w, ms in by_width.items()},
                                           self.ref_width, self.sc.bootstrap)
        for w, ms in by_width.items():
            row = {"kind": "ensemble", "step": step, "tokens": tokens, "width": w, "seed": -1,
                   "ref_width": self.ref_width, "params": param_count(ms[0]), **per_width[w], **outputs[w]}
            if len(ms) >= 2:
                sketch = torch.stack([sigs[m.name]["sketch"].double() for m in ms])
                row["logit_variance"] = float(sketch.var(0, correction=1).sum(-1).mean())
                row.update(self._ensemble_curve(w, step, [sigs[m.name] for m in ms]))
            self.write(row)
        self.write({"kind": "fit", "step": step, "tokens": tokens, "width": 0, "seed": -1,
                    "ref_width": self.ref_width, **est.fit_row(self.sc.bootstrap), **output_fits})

    def _ensemble_curve(self, width: int, step: int, sigs: list[dict]) -> dict:
        """L(E), acc(E) of width's averaged-logit ensembles: from stored logits, or the loop's LM curve."""
        if all("logits" in s for s in sigs):
            curve = EnsembleCurve(len(sigs))
            curve.add(torch.stack([s["logits"] for s in sigs]), self.spec.y.reshape(-1)[self.spec.sig_index])
            return curve.result()
        return self._lm_curves.pop((width, step), {})

    def _lm_ensembles(self, step: int, members: list) -> None:
        """Language models: ensemble probe losses of every width whose seeds are all evaluated now."""
        if self.spec.per_example == 1 or not self._due(step, self.sc.ensemble_every):
            return
        for w in sorted({m.width for m in members}):
            group = [m for m in members if m.width == w]
            if len(group) >= 2 and len(group) == sum(m.width == w for m in self.members):
                self._lm_curves[(w, step)] = lm_ensemble_curve([m.model for m in group], self.spec, self.device)

    # ------------------------------------------------------------------ ranks

    def sync_preacts(self, members: list | None = None) -> None:
        """Merge `members`' (default: all) preactivation summaries over the ranks into rank 0's, the
        whole global batch's (stats/ranks.py merge_over_ranks); before an evaluation or a
        checkpoint reads them. Collective when world > 1."""
        if self.world <= 1:
            return
        flat = {(m.name, layer): a for m in (self.members if members is None else members)
                for layer, a in self.acc.get(m.name, {}).items()}
        merge_over_ranks(flat, self.rank, self.world)

    def sync_ranges(self) -> None:
        """Every rank takes rank 0's preactivation histogram ranges (stats.hist_range 0), so all
        ranks hold the same accumulators and run the same collectives: a resumed rank that had not
        loaded the ranges would otherwise set them at the next evaluation with a forward of its own
        (under fsdp2 and ZeRO-3 a collective the other ranks never join). The cause, since fixed:
        those ranks read the ranges from their scratch run_dir, not from the run directory
        (ranges_dir); this stays as a guard that all ranks agree, one broadcast at start-up.
        Collective when world > 1."""
        if self.world <= 1:
            return
        ranges = broadcast_from_main(self.ranges)
        if self.ranges != ranges:
            self.ranges = ranges
            if ranges is None:  # rank 0 sets them at its first evaluation: so will this rank
                self.acc = {name: {} for name in self.acc}
            else:
                self._make_accumulators()

    def keep_on_main(self) -> None:
        """A loaded summary is rank 0's, already global: only rank 0 keeps it (load_state_dict)."""
        if self.rank != 0:
            for accs in self.acc.values():
                for a in accs.values():
                    a.reset()

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        return {"calls": dict(self.calls), "pending": [list(p) for p in self.pending],
                "ensembled": sorted(self._ensembled),
                "preact": {n: {l: a.state_dict() for l, a in accs.items()} for n, accs in self.acc.items()}}

    def load_state_dict(self, d: dict) -> None:
        self.calls.update(d.get("calls", {}))
        self.pending = [tuple(p) for p in d.get("pending", [])]
        self._ensembled = set(d.get("ensembled", []))
        for n, accs in d.get("preact", {}).items():
            for l, s in accs.items():
                if n in self.acc and l in self.acc[n]:
                    self.acc[n][l].load_state_dict(s)
        self.keep_on_main()
