"""Per-width error bars in summary.json and the figures (report/intervals.py), on runs whose answer is known."""
import json

import numpy as np
import pytest
import torch
import yaml

from fastwidth.report.cli import make_report
from fastwidth.report.intervals import width_intervals
from fastwidth.report.reader import load_run
from fastwidth.stats.ensemble import SeedEnsembles, tail_mean_ci
from fastwidth.run import RunDir
from fastwidth.run.members import MemberSpec
from fastwidth.stats.signature import save_signature

WIDTHS, REF, STEPS = [16, 32, 64], 64, [0, 10, 20, 30, 40]


def run_dir(path, seeds, loop_ci: bool, lr: float | None = None):
    """RMSE of seed s at width w and step t: w^-0.5 (1 + 0.1 s) + t/1e4; true logits of a known V_N.
    lr: a one-learning-rate sweep (sweep.lrs), whose rows carry base_lr and names the lr."""
    path.mkdir(parents=True)
    cfg = {"param": {"kind": "mup"}, "model": {"arch": "mlp"},
           "sweep": {"widths": WIDTHS, "seeds": seeds, "reference_width": REF, **({"lrs": [lr]} if lr else {})}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rng = np.random.default_rng(0)
    true = {w: torch.tensor(rng.standard_normal(50) + rng.standard_normal((len(seeds), 50)) * (4 / w) ** 0.5)
            for w in WIDTHS}
    rows = []
    for step in STEPS:
        for w in WIDTHS:
            for j, s in enumerate(seeds):
                base = {"step": step, "tokens": step * 8, "width": w, "seed": s, **({"base_lr": lr} if lr else {})}
                rows.append({"kind": "eval", **base, "probe_loss": 1.0})
                if w != REF:
                    rows.append({"kind": "consistency", **base, "ref": "live", "ref_width": REF,
                                 "true_logit_rmse": w ** -0.5 * (1 + 0.1 * s) + step / 1e4})
                if step == STEPS[-1]:
                    save_signature(RunDir(path).signature(MemberSpec(w, lr, s).name, step), {"true_logit": true[w][j].float()}, {})
    est = SeedEnsembles({w: t.float().double() for w, t in true.items()}, {w: seeds for w in WIDTHS}, REF)
    for w, r in est.width_rows(200).items():
        if not loop_ci:
            r.pop("seed_variance_ci", None)
        rows.append({"kind": "ensemble", "step": STEPS[-1], "tokens": STEPS[-1] * 8, "width": w, "seed": -1, **r,
                     **({"base_lr": lr} if lr else {})})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, est


@pytest.mark.parametrize("loop_ci", [pytest.param(True, marks=pytest.mark.slow), False])  # True: 3 s, second tier
def test_summary_json_carries_per_width_intervals_holding_their_values(tmp_path, loop_ci):
    seeds = [0, 1, 2, 3]
    path, est = run_dir(tmp_path / "run", seeds, loop_ci)
    make_report([path], tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    by_w = {r["width"]: r for r in doc["widths"]}
    for w in (16, 32):
        r = by_w[w]
        # late window: the last 25% of tokens = steps 30 and 40 (tokens 240, 320)
        per_seed = np.array([[w ** -0.5 * (1 + 0.1 * s) + t / 1e4 for t in (30, 40)] for s in seeds])
        assert r["true_logit_rmse"] == pytest.approx(per_seed.mean())
        assert r["true_logit_rmse_ci"] == pytest.approx(tail_mean_ci(per_seed, 1000, seed=w)[1])
        lo, hi = r["true_logit_rmse_ci"]
        assert lo < r["true_logit_rmse"] < hi
        lo, hi = r["seed_variance_ci"]
        assert lo <= r["seed_variance"] <= hi and hi > lo
    assert by_w[REF]["true_logit_rmse_ci"] is None
    # without the loop's interval the report bootstraps the stored logits: the same estimator
    want = est.width_rows(200 if loop_ci else 1000)[16]["seed_variance_ci"]
    assert by_w[16]["seed_variance_ci"] == pytest.approx(want, rel=1e-5)
    assert (tmp_path / "out" / "rmse_vs_width.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "ensemble_variance.png").stat().st_size > 10_000


def test_an_lr_sweep_reads_the_signatures_of_its_chosen_lr(tmp_path):
    """Its members are named w16_lr0.01_s0: the report's interval from the stored logits finds them
    (it looked for w16_s0 and silently left the interval out)."""
    path, est = run_dir(tmp_path / "run", [0, 1, 2, 3], loop_ci=False, lr=0.01)
    run = load_run(path)
    assert run.chosen_lr == 0.01
    iv = width_intervals(run)
    assert iv[16]["seed_variance_ci"] == pytest.approx(est.width_rows(1000)[16]["seed_variance_ci"], rel=1e-5)


def test_two_seeds_give_null_intervals(tmp_path):
    path, _ = run_dir(tmp_path / "run", [0, 1], loop_ci=False)
    iv = width_intervals(load_run(path))
    assert iv[16]["true_logit_rmse_ci"] is None and iv[16]["seed_variance_ci"] is None
    assert iv[16]["true_logit_rmse"] == pytest.approx(np.mean([16 ** -0.5 * (1 + 0.1 * s) + 0.0035 for s in (0, 1)]))
