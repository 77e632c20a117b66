"""The same-width CKA baseline read from a run's stored feature kernels into summary.json,
summary.md and cka.png (report/same_width.py)."""
import json

import pytest
import torch
import yaml

from fastwidth.report.figures import cka_vs_width
from fastwidth.report.reader import load_run
from fastwidth.report.summary import write_summary
from fastwidth.stats.metrics import cka
from fastwidth.run import RunDir
from fastwidth.stats.signature import save_signature

WIDTHS, REF, STEPS, P = [32, 64], 64, [10, 20], 10


def _kernel(seed, step, width):
    """fp16 like stored kernels: a shared part plus a seed- and width-specific part."""
    g = torch.Generator().manual_seed(1000 * width + 10 * seed + step)
    shared = torch.Generator().manual_seed(step)
    phi = torch.cat([torch.randn(P, 3, generator=shared), 0.8 * torch.randn(P, 3, generator=g)], 1)
    return (phi @ phi.T / 6).half()


def small_run(path, seeds):
    """A run directory in the §5 contract whose members stored kernels at every evaluation."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(
        {"param": {"kind": "mup"}, "sweep": {"widths": WIDTHS, "seeds": seeds, "reference_width": REF}}))
    rows = []
    for step in STEPS:
        for w in WIDTHS:
            for s in seeds:
                base = {"step": step, "tokens": 100 * step, "width": w, "seed": s}
                rows += [{"kind": "train", **base, "loss": 3.0}, {"kind": "eval", **base, "probe_loss": 3.0}]
                if w != REF:
                    rows.append({"kind": "consistency", **base, "ref": "live", "ref_width": REF, "ref_seed": s,
                                 "true_logit_rmse": 0.5, "cka": {"layer0": 0.5 + 0.01 * s, "layer1": 0.4}})
                save_signature(RunDir(path).signature(f"w{w}_s{s}", step),
                               {"kernel/layer0": _kernel(s, step, w), "kernel/layer1": _kernel(s, step + 1, w)}, {})
    rows.append({"kind": "run", "step": STEPS[-1], "tokens": 100 * STEPS[-1], "width": 0, "seed": 0})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_run(path)


def test_summary_and_figure_carry_the_same_width_cka(tmp_path):
    run = small_run(tmp_path / "run", [2, 0, 1])
    md = write_summary([run], {}, tmp_path).read_text()
    b = json.loads((tmp_path / "summary.json").read_text())["fits"]["cka_same_width"]
    assert (b["step"], b["ref_width"], b["half_a"], b["half_b"], b["n_pairs"]) == (20, REF, [0], [1, 2], 3)
    assert [d["step"] for d in b["by_step"]] == STEPS
    for step, d in zip(STEPS, b["by_step"]):
        for layer, off in (("layer0", 0), ("layer1", 1)):
            k = {s: _kernel(s, step + off, REF) for s in range(3)}    # the reference width's only
            pairs = (cka(k[0], k[1]) + cka(k[0], k[2]) + cka(k[1], k[2])) / 3
            assert d["pairs"][layer] == pytest.approx(pairs)
            assert d["halves"][layer] == pytest.approx(cka(k[0].double(), (k[1].double() + k[2].double()) / 2))
    assert b["pairs"] == b["by_step"][-1]["pairs"]
    row = next(l for l in md.splitlines() if l.startswith(f"| {REF} (ref), other seeds: 3 seed pairs"))
    assert f"{b['pairs']['layer0']:.4f}" in row and f"{b['pairs']['layer1']:.4f}" in row
    assert "| 32 | 0.5100 | 0.4000 |" in md                       # the cross-width rows beside it
    assert cka_vs_width([run], tmp_path / "cka.png").stat().st_size > 10_000


def test_one_seed_says_there_is_no_baseline(tmp_path):
    run = small_run(tmp_path / "run", [0])
    md = write_summary([run], {}, tmp_path).read_text()
    b = json.loads((tmp_path / "summary.json").read_text())["fits"]["cka_same_width"]
    assert b["seeds"] == [0] and "fewer than 2 seeds" in b["note"] and "pairs" not in b
    assert "Same-width baseline: none (fewer than 2 seeds" in md
    assert cka_vs_width([run], tmp_path / "cka.png") is not None
