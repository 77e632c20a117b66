"""Representations and losses (issue 31 item 7): class-sorted kernels, the loss-gap fit, the coordinate check."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastwidth.report.consistency_figures import class_order, kernel_heatmaps, kernel_point_labels
from fastwidth.report.reader import load_run, probe_labels
from fastwidth.run import RunDir


def test_class_order_sorts_labels_and_shows_a_planted_block_kernel():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(4), 5))           # 4 classes of 5, shuffled
    k = (labels[:, None] == labels[None, :]).astype(float) + 0.01 * rng.random((20, 20))
    perm, bounds = class_order(labels)
    assert list(labels[perm]) == sorted(labels) and bounds == [5, 10, 15]
    ks = k[np.ix_(perm, perm)]
    for i in range(20):                                             # each point's row moved whole
        assert np.array_equal(ks[i], k[perm[i]][perm])
    assert np.allclose(np.sort(ks.ravel()), np.sort(k.ravel()))
    blocks = np.kron(np.eye(4), np.ones((5, 5)))
    assert np.all((ks > 0.5) == (blocks > 0.5))                     # the blocks show, on the diagonal
    assert not np.all((k > 0.5) == (blocks > 0.5))                  # they did not in probe order


WIDTHS, SEEDS = [64, 128, 256, 512], [0, 1, 2, 3]


def tiny_run(path, gap=lambda w, s: 8.0 / w, steps=(0, 10, 50, 100), kernel=True):
    """A run directory by hand: eval rows whose probe loss is 2 + gap(w, s) below the reference
    width 512, coord rows (layer "hid" flat in width, "out" ∝ N), a kernel signature per width."""
    import json

    import yaml

    from fastwidth.stats.signature import save_signature
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"model": {"arch": "mlp"}, "train": {"steps": 100},
                                                      "sweep": {"widths": WIDTHS, "seeds": SEEDS}}))
    rows = []
    for t in steps:
        for w in WIDTHS:
            for s in SEEDS:
                base = {"step": t, "tokens": 10 * t, "width": w, "seed": s}
                rows.append({"kind": "eval", **base, "probe_loss": 2.0 + (gap(w, s) if w != 512 else 0.0)})
                if t:
                    layers = {"hid": {"act_rms": 1.0, "delta_rms": 0.1 * t, "own_rms": 0.05, "input_rms": 0.05},
                              "out": {"act_rms": 0.01 * w, "delta_rms": 0.001 * w * t, "own_rms": 0.001 * w,
                                      "input_rms": 0.0}}
                    rows.append({"kind": "coord", **base, "layers": layers})
                if kernel and t == steps[-1] and s == 0:
                    save_signature(RunDir(path).signature(f"w{w}_s{s}", t), {"kernel/layer0": torch.eye(8) + 1 / w},
                                   {"probe_points": 40, "kernel_points": 8})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_kernel_labels_come_from_the_probe_file(tmp_path):
    run_dir = tiny_run(tmp_path / "run")
    assert probe_labels(load_run(run_dir)) is None                  # no probe file: probe order
    y = torch.arange(40) % 4
    save_file({"x": torch.zeros(40, 3), "y": y}, str(RunDir(run_dir).probe))
    run = load_run(run_dir)
    assert torch.equal(probe_labels(run), y)
    got = kernel_point_labels(run, {"probe_points": 40, "kernel_points": 8}, 8)
    assert list(got) == [int(y[i]) for i in (0, 6, 11, 17, 22, 28, 33, 39)]
    assert kernel_point_labels(run, {"probe_points": 41, "kernel_points": 8}, 8) is None


def _planted_diffs(c, exp=-1.0, noise=0.002, seeds=6, widths=(64, 128, 256, 512, 1024), seed=0):
    rng = np.random.default_rng(seed)
    ref = rng.normal(2.0, noise, seeds)                           # L_ref,s
    return {w: (c * w ** exp + rng.normal(2.0, noise, seeds) - ref) if w != 1024 else np.zeros(seeds)
            for w in widths}


def test_loss_gap_fit_recovers_a_planted_inverse_width_gap():
    from fastwidth.report.loss_gap import fit_gap
    fit = fit_gap(_planted_diffs(c=20.0), 1024)
    lo, hi = fit["slope_ci"]
    assert fit["reason"] is None and lo <= -1.0 <= hi and hi - lo < 0.5
    assert fit["slope"] == pytest.approx(-1.0, abs=0.15) and fit["fit_widths"] == [64, 128, 256, 512]
    assert [p["width"] for p in fit["widths"]] == [64, 128, 256, 512]
    assert fit["widths"][0]["gap"] == pytest.approx(20 / 64, rel=0.05)


@pytest.mark.parametrize("diffs, needle", [
    (_planted_diffs(c=0.0), "ΔL_N <= 0"),                              # no gap at all: noise only
    ({w: np.abs(d) for w, d in _planted_diffs(c=0.0).items()}, "reaches 0"),
    ({w: d[:2] for w, d in _planted_diffs(c=20.0).items()}, "2 seed(s)"),
    ({w: d for w, d in _planted_diffs(c=20.0).items() if w in (64, 1024)}, "fewer than 2 widths")])
def test_loss_gap_without_a_gap_is_not_identified(diffs, needle):
    from fastwidth.report.loss_gap import _fit_text, fit_gap
    fit = fit_gap(diffs, 1024)
    assert fit["slope"] is None and fit["slope_ci"] is None and needle in fit["reason"]
    assert _fit_text(fit).startswith("not identified: ")


def test_a_run_gives_early_and_late_gap_fits_and_the_coord_flatness(tmp_path):
    from fastwidth.report import coord, loss_gap
    rng = np.random.default_rng(1)
    noise = {(w, s): rng.normal(0, 1e-3) for w in WIDTHS for s in SEEDS}
    run = load_run(tiny_run(tmp_path / "run", gap=lambda w, s: 8.0 / w + noise[w, s], kernel=False))
    assert loss_gap.eval_steps(run) == {"early": 10, "late": 100}    # first evaluation at >= 10% of 100 steps
    fits = loss_gap.gap_fits(run)
    for when in ("early", "late"):
        lo, hi = fits[when]["slope_ci"]
        assert lo <= -1.0 <= hi and fits[when]["fit_widths"] == [64, 128, 256]
    text = "\n".join(loss_gap.summary_lines([run]))
    assert text.count("slope -") == 2 and "not identified" not in text
    assert set(loss_gap.summary_json([run])[run.label]) == {"early", "late"}
    flat = coord.coord_flatness(run)
    assert flat["step"] == 100 and flat["n_seeds"] == 4
    assert flat["spread"]["hid"]["delta_rms"] == pytest.approx(1.0) and flat["spread"]["out"]["delta_rms"] == pytest.approx(8.0)
    assert flat["spread"]["out"]["input_rms"] is None
    assert coord.pick_steps(list(range(1, 101))) == [1, 5, 22, 100]


@pytest.mark.slow  # four figures, text layout: 5-25 s on a loaded 2-core machine
def test_the_section_figures_are_drawn_from_a_run(tmp_path):
    from fastwidth.report import coord, loss_gap
    run_dir = tiny_run(tmp_path / "run")
    save_file({"x": torch.zeros(40, 3), "y": torch.arange(40) % 4}, str(RunDir(run_dir).probe))
    run = load_run(run_dir)
    for name, draw in {**loss_gap.FIGURES, **coord.FIGURES, "coord_in_loop.png": coord.coord_in_loop,
                       "kernels.png": kernel_heatmaps}.items():
        assert draw([run], tmp_path / name).stat().st_size > 10_000, name
    flat = load_run(tiny_run(tmp_path / "flat", gap=lambda w, s: -0.01, kernel=False))   # every gap < 0:
    assert loss_gap.loss_gap_figure([flat], tmp_path / "neg.png").is_file()               # no log axis to fail


def test_a_run_without_a_gap_prints_not_identified(tmp_path):
    from fastwidth.report import coord, loss_gap
    run = load_run(tiny_run(tmp_path / "run", gap=lambda w, s: 0.001 * (-1) ** s, kernel=False))
    text = "\n".join(loss_gap.summary_lines([run]))
    assert text.count("not identified") == 2 and "slope" not in text.replace("not identified", "")
    assert coord.coord_tp5([load_run(tiny_run(tmp_path / "bare", steps=(0,), kernel=False))], tmp_path / "x.png") is None
