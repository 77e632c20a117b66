"""Point-wise figures and numbers (report/pointwise.py) on runs whose answer is planted."""
import json

import numpy as np
import pytest
import torch
import yaml

from fastwidth.report import pointwise as pw
from fastwidth.report.reader import load_run
from fastwidth.run import RunDir
from fastwidth.run.members import MemberSpec
from fastwidth.stats.signature import save_signature

WIDTHS, REF, STEPS, P = [16, 64], 64, [0, 1, 2, 4, 8], 300
SHIFT = {16: 0.5, 64: 0.0}            # the planted gap between the seed means: RMSE 0.5 at every step
DIP = [1.0, 0.5, 0.2, 0.3, 0.6]       # V_N over STEPS in the ensemble rows: the minimum at step 2


def run_dir(path, seeds, depths=None, signatures=True):
    path.mkdir(parents=True)
    sweep = {"widths": WIDTHS, "seeds": seeds, "reference_width": REF}
    if depths:
        sweep.update(depths=depths, reference_depth=max(depths))
    cfg = {"param": {"kind": "mup"}, "model": {"arch": "gpt"}, "stats": {"schedule": "log"}, "sweep": sweep}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rng = np.random.default_rng(0)
    base = rng.standard_normal(P)
    noise = rng.standard_normal((len(seeds), P)) * 0.05
    noise -= noise.mean(0)                    # the seed means carry exactly the planted shift
    rows = []
    for i, step in enumerate(STEPS):
        for w in WIDTHS:
            d = {"depth": max(depths)} if depths else {}
            for j, s in enumerate(seeds):
                rows.append({"kind": "eval", "step": step, "tokens": step * 64, "width": w, "seed": s, **d,
                             "probe_loss": 1.0})
                if signatures:
                    name = MemberSpec(w, None, s, max(depths) if depths else None).name
                    t = base * (1 + step / 10) + SHIFT[w] + noise[j]
                    save_signature(RunDir(path).signature(name, step), {"true_logit": torch.tensor(t).float()}, {})
            rows.append({"kind": "ensemble", "step": step, "tokens": step * 64, "width": w, "seed": -1, **d,
                         "n_seeds": len(seeds), "seed_variance": DIP[i] * 16 / w, "seed_variance_ci": None})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_run(path)


def test_three_steps_are_the_first_after_zero_the_middle_and_the_last():
    assert pw.three_steps([0, 1, 2, 4, 8, 16, 32]) == (1, 8, 32)
    assert pw.three_steps([0, 3, 9, 27]) == (3, 9, 27)
    assert pw.three_steps([0, 5, 10]) is None


def test_mean_rmse_finds_the_planted_gap_with_an_interval_from_three_seeds():
    rng = np.random.default_rng(1)
    base = rng.standard_normal(400)
    true = {w: base + SHIFT[w] + rng.standard_normal((4, 400)) * 0.05 for w in WIDTHS}
    (v, ci), = pw.mean_rmse(true, REF).values()
    means = {w: t.mean(0) for w, t in true.items()}
    assert v == pytest.approx(np.sqrt(np.mean((means[16] - means[64]) ** 2)))
    assert abs(v - 0.5) < 0.01 and ci[0] <= v <= ci[1] and 0.45 < ci[0] and ci[1] < 0.55
    (v2, ci2), = pw.mean_rmse({w: t[:2] for w, t in true.items()}, REF).values()
    assert ci2 is None and abs(v2 - 0.5) < 0.02


@pytest.mark.parametrize("depths", [None, [2, 4]])
def test_figures_and_numbers_of_a_planted_run(tmp_path, depths, monkeypatch):
    run = run_dir(tmp_path / "run", [0, 1, 2, 3], depths)
    nums = pw.run_numbers(run)
    assert nums["steps"] == {"early": 1, "middle": 4, "last": 8}
    r16, = nums["rmse"]
    for k in pw.STEP_NAMES:
        assert r16[k]["value"] == pytest.approx(0.5, abs=1e-5)
        assert r16[k]["ci"][0] <= 0.5 + 1e-5 and r16[k]["ci"][1] >= 0.5 - 1e-5
    ev = {e["width"]: e for e in nums["early_variance"]}
    assert ev[16]["min_step"] == 2 and ev[16]["seed_variance"][:3] == pytest.approx(DIP[:3])
    assert ev[64]["last"] == pytest.approx(DIP[-1] / 4)
    lines = "\n".join(pw.summary_lines([run]))
    assert "## Point-wise true logits (pointwise.png)" in lines and "| 16 | 0.5 [" in lines
    assert pw.summary_json([run])["runs"][0]["ref_width"] == REF
    if depths is None:  # drawing once is enough, and 3 probe points (3 panels, not 6)
        monkeypatch.setattr(pw, "N_PROBES", 3)
        for name, draw in pw.FIGURES.items():
            assert draw([run], tmp_path / name).stat().st_size > 10_000


def test_nothing_to_draw_without_signatures(tmp_path):
    run = run_dir(tmp_path / "run", [0, 1, 2], signatures=False)
    assert all(draw([run], tmp_path / name) is None for name, draw in pw.FIGURES.items())
    assert pw.summary_lines([run]) == [] and pw.summary_json([run]) == {}


def test_a_seed_without_signatures_at_the_reference_draws_nothing_and_does_not_fail(tmp_path):
    """One reference-width seed has no signatures at the picked steps (a member stopped early, as in
    the held-out transfer test's sweep, or files lost): the figures and numbers are left out, not a
    crash."""
    path = tmp_path / "run"
    run_dir(path, [0, 1, 2])
    lost = RunDir(path).signature(MemberSpec(REF, None, 1, None).name, STEPS[0]).parent
    for f in lost.glob("*.safetensors"):
        f.unlink()
    run = load_run(path)
    assert all(draw([run], tmp_path / name) is None for name, draw in pw.FIGURES.items())
    assert pw.summary_lines([run]) == [] and pw.summary_json([run]) == {}
