"""The Monitor's sharpness and eNTK rows of one member (stats/monitor.py's per-statistic writers).

A mixin of Monitor: it reads the Monitor's cfg, sc (cfg.stats), spec (the ProbeSpec), probe,
device, run_dir, train_batch (step -> this rank's training batch) and world (data-parallel
ranks). The estimators themselves are stats/sharpness.py and stats/ntk.py.
"""
from __future__ import annotations

from fastwidth.param.optim import lr_factor
from fastwidth.stats.ntk import eigh_desc, entk, group_lr_weights, probe_output_fn, task_power, task_power_by_class
from fastwidth.stats.sharpness import optimizer_preconditioner, train_batch_sharpness
from fastwidth.run.paths import RunDir
from fastwidth.stats.signature import save_signature


class CurvatureRows:
    """Monitor.sharpness(m, step) and Monitor.ntk(m, meta): the rows of kind "sharpness" and "ntk"."""

    def sharpness(self, m, step: int) -> dict:
        """The sharpness row of member m at evaluation `step`: stats.sharpness.train_batch_sharpness
        on the batch of the step just taken (the first batch at step 0), the one the batch_sharpness
        rows use at that step, cut to stats.sharpness_points examples (whole sequences for token
        streams): the first ⌈n/W⌉ of each of the W ranks' shares, so with W > 1 and n below the
        batch the examples differ from one process's. Says which batch (batch "train", batch_step,
        batch_examples) and how far Lanczos got (iters, converged, residual)."""
        sc, at = self.sc, max(step - 1, 0)
        if self.train_batch is None:
            raise ValueError("Monitor: sharpness rows need train_batch (step -> this rank's training batch)")
        x, y = self.train_batch(at)
        n = -(-sc.sharpness_points // self.spec.per_example)
        k = -(-n // self.world)
        x, y = x[:k].to(self.device), y[:k].to(self.device)
        engine = getattr(m, "engine", None)
        row = train_batch_sharpness(m.model, m.optimizer, x, y, self.cfg.train.loss, iters=sc.sharpness_iters,
                                    tol=sc.sharpness_tol, hvp=sc.hvp, seed=m.seed,
                                    reduce=engine.batch_mean if engine is not None else None)
        row.update(batch="train", batch_step=at, batch_examples=len(x) * self.world)
        lrs = {float(g["lr"]) for g in m.optimizer.param_groups}
        if row["precond"] == "lr" and len(lrs) == 1 and min(lrs) > 0:  # one LR: P = lr·I, so λ(H) = λ(P H) / lr
            row["sharpness"] = row["precond_sharpness"] / lrs.pop()
        return row

    def ntk(self, m, meta: dict | None = None) -> dict:
        """The eNTK row of member m; with meta (step, width, seed, name) also its kernel and top
        eigenvectors in signatures/<member>/ntk_step_<step>.safetensors. Computed with the torch
        reference kernels, so torch.func can batch the per-point gradients (fused kernels' autograd
        Functions do not trace; entk falls back to one backward per point where vmap fails)."""
        from fastwidth.kernels import dispatch

        sc, model = self.sc, m.model
        out = probe_output_fn(model, self.probe, sc.ntk_points, self.device, output=sc.ntk_output)
        params = [p for p in model.parameters() if p.requires_grad]
        weights, kernel = self._ntk_weights(m, params)
        was = model.training
        model.eval()
        info: dict = {}
        try:
            with dispatch.using("torch"):
                K, method = entk(out.fn, out.n, params, max_bytes=sc.ntk_max_mb << 20, weights=weights,
                                 batched=out.batched, info=info)
        finally:
            model.train(was)
        evals, evecs = eigh_desc(K)
        row = {"eigenvalues": evals.tolist(), "task_power": task_power(evecs, out.target).tolist(),
               "task_power_by_class": task_power_by_class(evecs, out.labels, out.task_classes),
               "trace": float(K.trace()), "ntk_class": out.cls, "method": method, "kernel": kernel,
               "output": sc.ntk_output, "grads": info.get("grads")}
        if meta is not None:
            k = min(sc.ntk_top_k, out.n)
            save_signature(RunDir(self.run_dir).ntk(m.name, meta["step"]),
                           {"kernel": K.float(), "eigenvectors": evecs[:, :k].float().contiguous(),
                            "eigenvalues": evals, "labels": out.labels.long()},
                           {**meta, "kernel": kernel, "output": sc.ntk_output, "ntk_class": out.cls,
                            "method": method, "probe_hash": self.spec.hash, "points": out.n, "top_k": k})
        return row

    def _ntk_weights(self, m, params: list) -> tuple[list | None, str]:
        """D of K = J D Jᵀ for stats.ntk_kernel: per-group LRs ("lr"), none ("raw"), Adam's preconditioner."""
        kind = self.sc.ntk_kernel
        if kind == "adam":
            precond, _, pkind = optimizer_preconditioner(m.optimizer, params)
            if pkind == "adam":
                return precond, "adam"
            kind = "lr"                                   # not Adam (or no state yet): the LR kernel
        if kind == "lr":
            return self._lr_weights(m), "lr"
        return None, "raw"

    def _lr_weights(self, m) -> list[float]:
        """Per-parameter LRs from the optimizer's groups; where a sharding engine's optimizer holds
        flat partitions instead of the model's parameters, from the µP table: optim.lr × lr_mult ×
        the schedule factor of the last step (what set_lr gave the groups)."""
        named = [(n, p) for n, p in m.model.named_parameters() if p.requires_grad]
        lrs = group_lr_weights(m.optimizer, [p for _, p in named])
        if all(lr > 0 for lr in lrs) or not m.table:
            return lrs
        cfg = getattr(m, "cfg", None) or self.cfg
        factor = lr_factor(max(m.step - 1, 0), cfg.optim, self.cfg.train.steps)
        out = []
        for (name, _), lr in zip(named, lrs):
            key = name.replace("_orig_mod.", "")
            while key.startswith("module."):
                key = key[len("module."):]
            info = m.table.get(key)
            out.append(cfg.optim.lr * info.lr_mult * factor if lr <= 0 and info is not None else lr)
        return out
