"""report/offline.py on planted runs: the per-width numbers are the report's own (ensemble rows,
width_intervals, the fit row), the gap is probe - train-subset loss, and b²_offline / b²_online
recovers a planted ratio, or says "not identified" where the online b² is 0."""
import json

import numpy as np
import pytest
import torch
import yaml

from fastwidth.report import offline
from fastwidth.report.reader import load_run
from fastwidth.run import RunDir
from fastwidth.run.members import MemberSpec
from fastwidth.stats.ensemble import SeedEnsembles
from fastwidth.stats.signature import save_signature

WIDTHS, REF, SEEDS, STEPS, P = [16, 32, 64], 64, [0, 1, 2, 3, 4, 5], [0, 10, 20], 400


def planted(path, k: int, shift: dict, seed: int):
    """True logits base + shift[w] u + noise (V_N = 0.4/w): b²_N = (shift[N] - shift[64])² (mean u² = 1);
    probe loss 1 + 1/w, train-subset loss (k > 0) 0.5 + 1/w at the end."""
    path.mkdir(parents=True)
    cfg = {"model": {"arch": "mlp"}, "data": {"train_size": k},
           "sweep": {"widths": WIDTHS, "seeds": SEEDS, "reference_width": REF}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rng = np.random.default_rng(seed)
    base, u = rng.standard_normal(P), rng.standard_normal(P)
    u /= np.sqrt((u ** 2).mean())
    true = {w: torch.tensor(base + shift[w] * u + rng.standard_normal((len(SEEDS), P)) * (0.4 / w) ** 0.5)
            for w in WIDTHS}
    rows = []
    for step in STEPS:
        for w in WIDTHS:
            for j, s in enumerate(SEEDS):
                end = step / STEPS[-1]
                sub = {"train_subset_loss": 2 - end * (1.5 - 1 / w)} if k else {}
                rows.append({"kind": "eval", "step": step, "tokens": step * 8, "width": w, "seed": s,
                             "probe_loss": 2 - end * (1 - 1 / w), **sub})
                if step == STEPS[-1]:
                    save_signature(RunDir(path).signature(MemberSpec(w, None, s).name, step),
                                   {"true_logit": true[w][j].float()}, {})
    est = SeedEnsembles({w: t.float().double() for w, t in true.items()}, {w: SEEDS for w in WIDTHS}, REF)
    end = {"step": STEPS[-1], "tokens": STEPS[-1] * 8, "seed": -1}
    rows += [{"kind": "ensemble", **end, "width": w, **r} for w, r in est.width_rows(200).items()]
    rows.append({"kind": "fit", **end, "width": 0, **est.fit_row(200)})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_run(path), est


def test_offline_numbers_and_ratio(tmp_path):
    off, est_off = planted(tmp_path / "off", 2048, {16: 0.6, 32: 0.3, 64: 0.0}, 1)
    on, _ = planted(tmp_path / "on", 0, {16: 0.3, 32: 0.15, 64: 0.0}, 2)
    nums = offline.run_numbers(off)
    w16 = next(r for r in nums["widths"] if r["width"] == 16)
    assert w16["gap"] == pytest.approx(0.5) and w16["probe_loss"] == pytest.approx(1 + 1 / 16)
    assert w16["bias_sq_debiased"] == pytest.approx(est_off.width_rows(200)[16]["bias_sq_debiased"])
    assert w16["bias_sq_debiased"] == pytest.approx(0.36, rel=0.1)
    assert nums["variance_slope"] == pytest.approx(-1.0, abs=0.3)                 # V_N = 0.4 / N
    assert offline.pair([on, off]) == (off, on)
    ratio = {r["width"]: r for r in offline.bias_ratio(off, on)}
    lo, hi = ratio[16]["ratio_ci"]
    assert ratio[16]["ratio"] == pytest.approx(4.0, rel=0.25) and lo < 4.0 < hi and lo > 1   # planted 0.36 / 0.09
    lo, hi = ratio[16]["difference_ci"]                                             # planted 0.36 - 0.09
    assert ratio[16]["difference"] == pytest.approx(0.27, abs=0.08) and lo < 0.27 < hi and lo > 0
    lo, hi = ratio[16]["rmse_ratio_ci"]   # the RMSE holds both runs' seed variance (0.4/N): above 1, below 2
    assert 1.0 < ratio[16]["rmse_ratio"] < 2.0 and lo < ratio[16]["rmse_ratio"] < hi
    flat, _ = planted(tmp_path / "flat", 0, {16: 0.0, 32: 0.0, 64: 0.0}, 3)
    flat_rows = {r["width"]: r for r in offline.bias_ratio(off, flat)}
    assert "ratio" not in flat_rows[16] and flat_rows[16]["difference_ci"][0] > 0  # no online bias: no ratio, a difference
    assert all("not identified" in line for line in offline.summary_lines([off, flat]) if line.startswith("| 16 |"))
    doc = offline.summary_json([off, on])
    assert doc["bias_ratio"]["widths"][0]["width"] == 16 and len(doc["runs"]) == 2
    assert offline.summary_json([on]) == {} and offline.draw([on], tmp_path / "x.png") is None


@pytest.mark.slow  # matplotlib: a two-row figure, about 4 s on the shared cores
def test_offline_figure(tmp_path):
    off, _ = planted(tmp_path / "off", 2048, {16: 0.6, 32: 0.3, 64: 0.0}, 1)
    on, _ = planted(tmp_path / "on", 0, {16: 0.3, 32: 0.15, 64: 0.0}, 2)
    assert offline.draw([off, on], tmp_path / "offline.png").stat().st_size > 20_000
