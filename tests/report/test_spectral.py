"""report/spectral.py on a run directory written by hand: kernels whose ±1 target sits in the
3rd eigenvector at the reference width and in the 25th at width 32 (ΔC(16) = 1), read from
signatures/, joined with the ensemble rows' debiased b², drawn, tabled and put in summary.json."""
import json

import pytest
import torch
import yaml

from fastwidth.report import spectral
from fastwidth.report.reader import load_run
from fastwidth.run import RunDir
from fastwidth.stats.ntk import eigh_desc
from fastwidth.stats.signature import save_signature

N, WIDTHS, SEEDS, STEP = 40, [32, 64], [0, 1, 2, 3], 100


def planted_run(path):
    path.mkdir(parents=True)
    cfg = {"param": {"kind": "mup"}, "sweep": {"widths": WIDTHS, "seeds": SEEDS, "reference_width": 64}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    labels = torch.arange(N) % 2
    y = torch.where(labels == 0, 1.0, -1.0).double()
    A = torch.randn(N, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    A[:, 0] = y
    Q = torch.linalg.qr(A)[0]
    Q = torch.cat([Q[:, 1:3], Q[:, :1], Q[:, 3:]], 1)                  # the target's direction 3rd
    lam = torch.tensor([1.0 / (k + 1) for k in range(N)], dtype=torch.float64)
    rows = []
    for w in WIDTHS:
        lw = lam.clone()
        if w == 32:
            lw[2], lw[24] = lam[24], lam[2]                              # into the 25th, slower mode
        for s in SEEDS:
            K = Q @ torch.diag(lw * (1 + 0.1 * s)) @ Q.T
            ev, U = eigh_desc(K)
            save_signature(RunDir(path).ntk(f"w{w}_s{s}", STEP),
                           {"kernel": K.float(), "eigenvectors": U[:, :8].float().contiguous(), "eigenvalues": ev,
                            "labels": labels},
                           {"step": STEP, "width": w, "seed": s, "name": f"w{w}_s{s}", "kernel": "lr",
                            "output": "class", "ntk_class": 0, "method": "exact", "points": N, "top_k": 8})
            rows.append({"kind": "eval", "step": STEP, "tokens": STEP, "width": w, "seed": s, "probe_loss": 0.5})
        rows.append({"kind": "ensemble", "step": STEP, "tokens": STEP, "width": w, "seed": -1, "n_seeds": 4,
                     **({"bias_sq_debiased": 0.3, "bias_sq_debiased_ci": [0.2, 0.4]} if w == 32 else {})})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_run(path)


def test_spectral_section_reads_planted_kernels(tmp_path, monkeypatch):
    monkeypatch.setattr(spectral, "N_BOOT", 10)
    run = planted_run(tmp_path / "run")
    doc = spectral.summary_json([run])[run.label]
    (last,) = doc["steps"]
    w32, ref = last["widths"]
    assert doc["step"] == STEP == last["step"] and ref["reference"] and ref["c_k"] == pytest.approx(1.0)
    assert w32["c_k"] == pytest.approx(0.0, abs=1e-6) and w32["delta_c"] == pytest.approx(1.0, abs=1e-6)
    assert w32["discrepancy"] == pytest.approx(0.0, abs=1e-6)        # the same eigenvalues, permuted
    assert w32["bias_sq_debiased"] == 0.3 and w32["bias_sq_debiased_ci"] == [0.2, 0.4]
    assert last["baseline"]["half_a"] == [0, 1] and last["baseline"]["discrepancy"] == pytest.approx(0.0, abs=1e-6)
    lines = "\n".join(spectral.summary_lines([run]))
    assert f"## {spectral.HEADING}" in lines and "| 32 | 4 | " in lines


@pytest.mark.slow
def test_spectral_figures_are_drawn(tmp_path, monkeypatch):
    monkeypatch.setattr(spectral, "N_BOOT", 10)
    run = planted_run(tmp_path / "run")
    for name, draw in spectral.FIGURES.items():
        assert draw([run], tmp_path / name).stat().st_size > 10_000


def test_spectral_section_is_empty_without_stored_kernels(tmp_path):
    run = planted_run(tmp_path / "run")
    for p in RunDir(run.path).signatures.glob("*/ntk_step_*.safetensors"):
        p.unlink()
    run = load_run(run.path)
    assert spectral.summary_lines([run]) == [] and spectral.summary_json([run]) == {}
    assert spectral.FIGURES["spectral.png"]([run], tmp_path / "x.png") is None
