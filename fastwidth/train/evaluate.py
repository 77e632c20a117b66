"""Probe evaluation in the loop: loss, accuracy and the per-example true-class logits.

Every `stats.every` steps each model evaluates the fixed probe split; the true-class logits are
kept (in memory and as a small safetensors signature per model and step) and each model is
compared with the reference width: true-logit RMSE against the reference model of the same seed
and against the mean over the reference width's seeds (DESIGN.md §4's headline metric).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

PROBE_CHUNK = 16  # probe rows per forward: bounds eval memory at (16, T, V) logits


class Evaluator:
    def __init__(self, cfg, run_dir: Path, members: list, probe: dict, writer, device, autocast):
        self.cfg, self.run_dir, self.writer, self.device = cfg, Path(run_dir), writer, device
        self.members = members
        self.probe = probe
        self.autocast = autocast
        self.ref_width = cfg.sweep.reference_width
        self.true_logits: dict[tuple[str, int], torch.Tensor] = {}  # (member, step) -> (P,) or (P, T)
        self.pending: list[tuple] = []  # comparisons waiting for the reference (sequential mode)

    def training(self, member):
        """Context around a member's training forward/backward (hooks live here)."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def probe_outputs(self, member) -> dict[str, torch.Tensor]:
        model = member.model
        was_training = model.training
        model.eval()
        x_all, y_all = self.probe["x"], self.probe["y"]
        true, loss, correct = [], [], []
        for i in range(0, x_all.shape[0], PROBE_CHUNK):
            x = x_all[i:i + PROBE_CHUNK].to(self.device)
            y = y_all[i:i + PROBE_CHUNK].to(self.device)
            with self.autocast:
                logits = model(x)
            logits = logits.float()  # (b, C) or (b, T, V)
            true.append(logits.gather(-1, y.unsqueeze(-1)).squeeze(-1).cpu())
            loss.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                        reduction="none").reshape(y.shape).cpu())
            correct.append((logits.argmax(-1) == y).cpu())
        model.train(was_training)
        return {"true_logit": torch.cat(true), "loss": torch.cat(loss), "correct": torch.cat(correct)}

    def evaluate(self, step: int, tokens: int, members: list | None = None) -> None:
        for m in members if members is not None else self.members:
            out = self.probe_outputs(m)
            self.true_logits[(m.name, step)] = out["true_logit"]
            sig_dir = self.run_dir / "signatures" / m.name
            sig_dir.mkdir(parents=True, exist_ok=True)
            save_file({"true_logit": out["true_logit"].contiguous(), "loss": out["loss"].contiguous()},
                      str(sig_dir / f"step_{step:06d}.safetensors"))
            self.writer.write({"kind": "eval", "step": step, "tokens": tokens, "width": m.width, "seed": m.seed,
                               "probe_loss": float(out["loss"].mean()),
                               "probe_acc": float(out["correct"].float().mean())})
            self.pending.append((m, step, tokens))
        self.flush_pending()

    def flush_pending(self) -> None:
        """Write consistency rows for every evaluated model whose reference is available."""
        ref_seeds = [m.seed for m in self.members if m.width == self.ref_width]
        waiting = []
        for m, step, tokens in self.pending:
            refs = [self.true_logits.get((f"w{self.ref_width}_s{s}", step)) for s in ref_seeds]
            if any(r is None for r in refs):
                waiting.append((m, step, tokens))
                continue
            if m.width == self.ref_width:
                continue
            mine = self.true_logits[(m.name, step)]
            row = {"kind": "consistency", "step": step, "tokens": tokens, "width": m.width, "seed": m.seed,
                   "ref_width": self.ref_width,
                   "true_logit_rmse_ens": float((mine - torch.stack(refs).mean(0)).pow(2).mean().sqrt())}
            if m.seed in ref_seeds:
                same = refs[ref_seeds.index(m.seed)]
                row["true_logit_rmse"] = float((mine - same).pow(2).mean().sqrt())
            else:
                row["true_logit_rmse"] = row["true_logit_rmse_ens"]
            self.writer.write(row)
        self.pending = waiting

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
