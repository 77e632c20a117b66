"""The Monitor driven by a minimal lock-step loop over hand-made models (the loop's contract)."""
import json
import math

import numpy as np
import pytest
import torch

from fastwidth.config import Config, dump_yaml
from fastwidth.stats.moments import histogram_ref, moments_ref
from fastwidth.stats.monitor import Monitor
from fastwidth.run import RunDir
from fastwidth.stats.signature import load_signature
from stats_toys import ListWriter, Member, ToyMLP, teacher_data

STEPS, EVERY, B = 6, 3, 16


def make_cfg(widths, seeds, **stats):
    cfg = Config()
    cfg.sweep.widths, cfg.sweep.seeds, cfg.sweep.reference_width = widths, seeds, max(widths)
    cfg.train.steps = STEPS
    cfg.stats.every = EVERY
    cfg.stats.kernel_points = 16
    cfg.stats.hist_range = 3.0
    cfg.stats.sharpness_iters = 5
    cfg.stats.ntk_points = 6
    for k, v in stats.items():
        setattr(cfg.stats, k, v)
    return cfg


def train_batch(step):
    """The training batch of `step` in drive() (the loop's Trainer.batch)."""
    return teacher_data(B, seed=step)


def drive(run_dir, widths, seeds, ref_width=None, record=None, **stats):
    cfg = make_cfg(widths, seeds, **stats)
    if ref_width:
        cfg.sweep.reference_width = ref_width
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    members = [Member(w, s, ToyMLP(6, w, 4, seed=s)) for w in widths for s in seeds]
    if record:
        record(members)
    px, py = teacher_data(40, seed=99)
    writer = ListWriter()
    mon = Monitor(cfg, run_dir, members, {"x": px, "y": py}, writer, "cpu", train_batch=train_batch)
    mon.evaluate(0, 0)
    for step in range(STEPS):
        train_members(mon, members, step)
        if (step + 1) % EVERY == 0:
            mon.evaluate(step + 1, (step + 1) * B)
    return writer.rows, mon, members


def train_members(mon, members, step):
    """One SGD step of every member on the batch of `step`, its forward under mon.training."""
    x, y = train_batch(step)
    for m in members:
        with mon.training(m):
            loss = m.model.loss(x, y)
        loss.backward()
        m.optimizer.step()
        m.optimizer.zero_grad()


def _rows(rows, kind, **match):
    return [r for r in rows if r["kind"] == kind and all(r.get(k) == v for k, v in match.items())]


def test_rows_and_signatures(tmp_path):
    rows, mon, members = drive(tmp_path / "a", [8, 16, 32], [0, 1])
    for r in rows:
        assert {"kind", "step", "tokens", "width", "seed"} <= r.keys()
    assert len(_rows(rows, "eval")) == 6 * 3
    cons = _rows(rows, "consistency")
    assert len(cons) == 4 * 3  # widths 8, 16 x 2 seeds x 3 evals, never the reference itself
    for r in cons:
        assert r["ref_width"] == 32 and r["ref"] == "live" and r["ref_seed"] == r["seed"]
        assert r["true_logit_rmse"] > 0 and set(r["cka"]) == {"layer0", "layer1"}
        assert 0 <= r["top1_agreement"] <= 1 and set(r["preact_w1"]) == {"layer0", "layer1"}
        if r["step"] > 0:  # step 0 has seen no training batch: no histogram, W1 null
            assert all(v is not None and v > 0 for v in r["preact_w1"].values()), r["preact_w1"]
    ens = _rows(rows, "ensemble", step=STEPS)
    assert [r["width"] for r in ens] == [8, 16, 32] and all(r["seed_variance"] > 0 for r in ens)
    fit = _rows(rows, "fit", step=STEPS)[0]
    assert math.isfinite(fit["variance_slope"]) and math.isfinite(fit["rmse_slope"])
    # sharpness and NTK at the final evaluation only (cadence 0)
    assert {r["step"] for r in _rows(rows, "sharpness")} == {STEPS}
    for r in _rows(rows, "sharpness"):  # on the batch of the last step; 5 Lanczos steps (make_cfg)
        assert (r["batch"], r["batch_step"], r["batch_examples"]) == ("train", STEPS - 1, B)
        assert r["iters"] <= 5 and r["converged"] == (r["residual"] <= 1e-2) and r["precond_sharpness"] > 0
    nt = _rows(rows, "ntk")
    assert len(nt) == 6 and len(nt[0]["eigenvalues"]) == 6 and nt[0]["task_power"][-1] == pytest.approx(1.0)
    sigs = RunDir(tmp_path / "a").list_signatures()
    assert set(sigs) == {m.name for m in members} and set(sigs["w8_s0"]) == {0, 3, 6}


def test_consistency_rows_equal_offline_metrics(tmp_path):
    rows, mon, members = drive(tmp_path / "a", [8, 32], [0, 1])
    a, _ = load_signature(tmp_path / "a/signatures/w8_s1/step_00000006.safetensors")
    r0, _ = load_signature(tmp_path / "a/signatures/w32_s0/step_00000006.safetensors")
    r1, _ = load_signature(tmp_path / "a/signatures/w32_s1/step_00000006.safetensors")
    row = _rows(rows, "consistency", step=STEPS, width=8, seed=1)[0]
    ta, t1, t0 = (s["true_logit"].double().numpy() for s in (a, r1, r0))
    assert row["true_logit_rmse"] == pytest.approx(np.sqrt(((ta - t1) ** 2).mean()), rel=1e-12)
    assert row["true_logit_rmse_vs_mean"] == pytest.approx(np.sqrt(((ta - (t0 + t1) / 2) ** 2).mean()), rel=1e-12)
    ens = _rows(rows, "ensemble", step=STEPS, width=32)[0]
    assert ens["seed_variance"] == pytest.approx(np.var([t0, t1], axis=0, ddof=1).mean(), rel=1e-12)


def test_streaming_preacts_equal_dumped_tensors(tmp_path):
    # a second hook dumps the first layer's training preactivations; the streamed summary must match
    dumped = []
    run_dir = tmp_path / "b"
    cfg = make_cfg([8], [0])
    run_dir.mkdir()
    m = Member(8, 0, ToyMLP(6, 8, 4, seed=0))
    px, py = teacher_data(40, seed=99)
    writer = ListWriter()
    mon = Monitor(cfg, run_dir, [m], {"x": px, "y": py}, writer, "cpu")
    recording = [False]
    m.model.layers[0].register_forward_hook(lambda _m, _i, out: dumped.append(out.detach().clone())
                                            if recording[0] else None)
    for step in range(EVERY):
        x, y = teacher_data(B, seed=step)
        with mon.training(m):
            recording[0] = True
            loss = m.model.loss(x, y)
            recording[0] = False
        loss.backward()
        m.optimizer.step()
        m.optimizer.zero_grad()
    mon.evaluate(EVERY, EVERY * B)
    flat = torch.cat([d.reshape(-1) for d in dumped])
    want = moments_ref(flat)
    got = _rows(writer.rows, "eval")[0]["preact"]["layer0"]
    for k in ("mean", "var", "skew", "kurt", "min", "max"):
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k
    sig, meta = load_signature(run_dir / f"signatures/w8_s0/step_{EVERY:08d}.safetensors")
    sampled = torch.cat([d.reshape(-1)[::cfg.stats.hist_stride] for d in dumped])  # every k-th element per batch
    assert cfg.stats.hist_stride > 1
    np.testing.assert_array_equal(sig["preact_hist/layer0"].numpy(), histogram_ref(sampled, 64, -3.0, 3.0))
    assert sig["preact/layer0"][0] == flat.numel() and meta["hist_lo"] == -3.0


def test_reference_run_equals_live_comparison(tmp_path):
    live, _, _ = drive(tmp_path / "ref", [8, 32], [0, 1])
    stored, _, _ = drive(tmp_path / "solo", [8], [0, 1], reference_run=str(tmp_path / "ref"))
    got = _rows(stored, "consistency", ref="run")
    assert len(got) == 6 and all(r["ref_width"] == 32 for r in got)
    for r in got:
        want = _rows(live, "consistency", ref="live", step=r["step"], width=r["width"], seed=r["seed"])[0]
        strip = lambda d: {k: v for k, v in d.items() if k not in ("ref", "ref_run")}
        assert strip(r) == strip(want)
        # and both equal the metric recomputed offline from the two runs' signature files
        a, _ = load_signature(tmp_path / f"solo/signatures/w8_s{r['seed']}/step_{r['step']:08d}.safetensors")
        b, _ = load_signature(tmp_path / f"ref/signatures/w32_s{r['seed']}/step_{r['step']:08d}.safetensors")
        ta, tb = a["true_logit"].double().numpy(), b["true_logit"].double().numpy()
        assert r["true_logit_rmse"] == pytest.approx(np.sqrt(((ta - tb) ** 2).mean()), rel=1e-12)
        assert r["top1_agreement"] == pytest.approx((a["argmax"] == b["argmax"]).double().mean().item())
    assert not _rows(stored, "consistency", ref="live")  # its own reference width is 8: nothing to compare


def test_reference_run_mismatch_is_a_user_error(tmp_path):
    from fastwidth.errors import UserError
    drive(tmp_path / "ref", [8, 16], [0])
    with pytest.raises(UserError, match="sketch_dim"):
        drive(tmp_path / "solo", [8], [0], reference_run=str(tmp_path / "ref"), sketch_dim=4)
    with pytest.raises(UserError, match="not a run directory"):
        drive(tmp_path / "solo2", [8], [0], reference_run=str(tmp_path / "nowhere"))


def test_sequential_mode_waits_for_reference(tmp_path):
    cfg = make_cfg([8, 16], [0])
    small, big = Member(8, 0, ToyMLP(6, 8, 4)), Member(16, 0, ToyMLP(6, 16, 4))
    px, py = teacher_data(20, seed=5)
    writer = ListWriter()
    mon = Monitor(cfg, tmp_path, [big, small], {"x": px, "y": py}, writer, "cpu")
    mon.evaluate(0, 0, [small])
    assert not _rows(writer.rows, "consistency") and mon.pending
    state = json.loads(json.dumps(mon.state_dict()))
    mon2 = Monitor(cfg, tmp_path, [big, small], {"x": px, "y": py}, writer, "cpu")
    mon2.load_state_dict(state)
    mon2.evaluate(0, 0, [big])
    assert len(_rows(writer.rows, "consistency")) == 1 and not mon2.pending


def test_preact_every_and_disabled_parts(tmp_path):
    rows, mon, _ = drive(tmp_path / "a", [8, 16], [0], preact_every=3, kernel_points=0, sharpness_iters=0,
                         ntk_points=0)
    sig, _ = load_signature(tmp_path / "a/signatures/w8_s0/step_00000003.safetensors")
    assert sig["preact/layer0"][0] == B * 8  # one of three batches, 8 units
    assert not any(k.startswith("kernel/") for k in sig)
    assert not _rows(rows, "sharpness") and not _rows(rows, "ntk")
    assert "cka" not in _rows(rows, "consistency")[0]


def test_histogram_ranges_come_from_the_reference_widths_first_eval(tmp_path):
    rows, mon, members = drive(tmp_path / "a", [8, 16], [0, 1], hist_range=0.0, hist_units="raw", hist_quantile=0.01,
                               hist_margin=0.5)
    ranges = json.loads((tmp_path / "a" / "preact_ranges.json").read_text())
    # offline: the [1%, 99%] quantiles of the width-16 models' first-layer outputs on the probe, at init
    px, _ = teacher_data(40, seed=99)
    init = [ToyMLP(6, 16, 4, seed=s).layers[0](px).detach().reshape(-1) for s in (0, 1)]
    q_lo, q_hi = np.quantile(torch.cat(init).double().numpy(), [0.01, 0.99])
    span = q_hi - q_lo
    assert ranges["layer0"] == pytest.approx([q_lo - 0.5 * span, q_hi + 0.5 * span], rel=1e-6)
    sig, meta = load_signature(tmp_path / "a/signatures/w8_s0/step_00000006.safetensors")
    assert meta["hist_ranges"] == ranges and sig["preact_hist/layer0"].numel() == 64 + 2
    ev = [r for r in _rows(rows, "eval", step=6)]
    frac = [r["preact"]["layer0"]["out_of_range"] for r in ev]
    assert all(0 <= f < 0.5 for f in frac)
    h = sig["preact_hist/layer0"].numpy()
    assert ev[0]["preact"]["layer0"]["out_of_range"] == pytest.approx((h[0] + h[-1]) / h.sum())
    # a comparison run against this one reuses its bins; a fixed-range reference is refused
    again, _, _ = drive(tmp_path / "b", [8], [0], hist_range=0.0, hist_units="raw", reference_run=str(tmp_path / "a"))
    assert json.loads((tmp_path / "b" / "preact_ranges.json").read_text()) == ranges
    assert {r["width"] for r in _rows(again, "consistency", ref="run")} == {8}
    from fastwidth.errors import UserError
    drive(tmp_path / "fixed", [8, 16], [0])
    with pytest.raises(UserError, match="no preactivation ranges"):
        drive(tmp_path / "c", [8], [0], hist_range=0.0, reference_run=str(tmp_path / "fixed"))


def test_asinh_bins_from_the_reference_width_streaming_equals_offline(tmp_path):
    """hist_units asinh (the default): each layer's centre and scale are the mean and std of the
    width-16 seeds' first-layer outputs on the probe at init, the body reaches hist_reach stds;
    every member's histogram equals float64 offline binning of its dumped training preactivations;
    out_of_range is the overflow share; W1 uses the bins' raw-unit centers; a run against this one
    as stats.reference_run takes the same bins and gives the live comparison's numbers."""
    from fastwidth.stats.preact_range import Bins
    dumped = {}

    def record(members):
        for m in members:
            m.model.layers[1].register_forward_hook(
                lambda mod, i, out, k=m.name: dumped.setdefault(k, []).append(out.detach().clone()) if mod.training else None)

    rows, mon, members = drive(tmp_path / "a", [8, 16], [0, 1], hist_range=0.0, hist_reach=50.0, record=record,
                               sharpness_iters=0, ntk_points=0)
    ranges = json.loads((tmp_path / "a" / "preact_ranges.json").read_text())
    px, _ = teacher_data(40, seed=99)
    init = torch.cat([ToyMLP(6, 16, 4, seed=s).layers[0](px).detach().reshape(-1) for s in (0, 1)]).double()
    b = Bins.of(ranges["layer0"])
    assert (b.units, b.hi) == ("asinh", pytest.approx(math.asinh(50.0)))
    assert (b.center, b.scale) == (pytest.approx(float(init.mean()), rel=1e-9), pytest.approx(float(init.std(correction=0)), rel=1e-9))
    layer1 = Bins.of(ranges["layer1"])
    lo, hi, n = layer1.accumulator(64)
    for m in members:   # steps 4..6: the second interval's batches
        sig, meta = load_signature(tmp_path / f"a/signatures/{m.name}/step_{STEPS:08d}.safetensors")
        assert meta["hist_ranges"] == ranges
        sampled = torch.cat([d.reshape(-1)[::16] for d in dumped[m.name][EVERY:STEPS]])
        h = sig["preact_hist/layer1"].numpy()
        np.testing.assert_array_equal(h, histogram_ref(sampled, n, lo, hi, asinh=layer1.asinh))
        ev = _rows(rows, "eval", step=STEPS, width=m.width, seed=m.seed)[0]["preact"]["layer1"]
        assert ev["out_of_range"] == pytest.approx((h[0] + h[-1]) / h.sum())
    row = _rows(rows, "consistency", step=STEPS, width=8, seed=1)[0]
    a, _ = load_signature(tmp_path / f"a/signatures/w8_s1/step_{STEPS:08d}.safetensors")
    r, _ = load_signature(tmp_path / f"a/signatures/w16_s1/step_{STEPS:08d}.safetensors")
    ca, cr = (np.cumsum(x["preact_hist/layer1"].numpy()) / x["preact_hist/layer1"].numpy().sum() for x in (a, r))
    want = float((np.abs(ca - cr)[:-1] * np.diff(layer1.centers(n))).sum())
    assert row["preact_w1"]["layer1"] == pytest.approx(want, rel=1e-12) and want > 0
    assert row["preact_w1_std"]["layer1"] == pytest.approx(want / float(r["preact/layer1"][2]) ** 0.5, rel=1e-12)
    again, _, _ = drive(tmp_path / "b", [8], [0, 1], hist_range=0.0, reference_run=str(tmp_path / "a"))
    assert json.loads((tmp_path / "b" / "preact_ranges.json").read_text()) == ranges
    got = _rows(again, "consistency", ref="run", step=STEPS, seed=1)[0]
    assert got["preact_w1"] == row["preact_w1"] and got["preact_w1_std"] == row["preact_w1_std"]


def test_ranges_come_from_ranges_dir_when_run_dir_is_scratch(tmp_path):
    """A distributed run's other ranks write into a scratch run_dir emptied at each start: their
    Monitor reads the run's preact_ranges.json (ranges_dir), so a resumed rank holds the same bins
    and accumulators as rank 0 before any evaluation (no forward of its own to set them)."""
    drive(tmp_path / "a", [8, 16], [0], hist_range=0.0)
    ranges = json.loads((tmp_path / "a" / "preact_ranges.json").read_text())
    cfg = make_cfg([8, 16], [0], hist_range=0.0)
    scratch = tmp_path / "a" / ".rank1"
    scratch.mkdir()
    members = [Member(w, 0, ToyMLP(6, w, 4)) for w in (8, 16)]
    px, py = teacher_data(40, seed=99)
    mon = Monitor(cfg, scratch, members, {"x": px, "y": py}, ListWriter(), "cpu", ranges_dir=tmp_path / "a")
    assert mon.ranges == ranges and ranges["layer0"]["units"] == "asinh"
    assert all(set(mon.acc[m.name]) == {"layer0", "layer1"} for m in members)
    assert mon.acc["w8_s0"]["layer1"].asinh == (ranges["layer1"]["center"], ranges["layer1"]["scale"])
    assert json.loads((scratch / "preact_ranges.json").read_text()) == ranges
    alone = Monitor(cfg, tmp_path / "empty", members, {"x": px, "y": py}, ListWriter(), "cpu")
    assert alone.ranges is None and not any(alone.acc.values())  # without it: set at its first evaluation


@pytest.mark.parametrize("output", ["class", "trace"])
def test_ntk_rows_and_stored_kernels_equal_offline(tmp_path, output):
    from fastwidth.stats.ntk import entk, probe_output_fn, task_power_by_class
    rows, mon, members = drive(tmp_path / "a", [8, 16], [0, 1], ntk_points=10, ntk_top_k=4, ntk_output=output)
    files = RunDir(tmp_path / "a").list_ntk()
    assert set(files) == {m.name for m in members} and all(set(v) == {STEPS} for v in files.values())
    assert set(RunDir(tmp_path / "a").list_signatures()["w8_s0"]) == {0, 3, 6}     # eNTK files are not signatures
    px, py = teacher_data(40, seed=99)
    for m in members:
        row = _rows(rows, "ntk", width=m.width, seed=m.seed)[0]
        assert row["grads"] == "vmap" and row["output"] == output and row["kernel"] == "lr"
        stored, meta = load_signature(files[m.name][STEPS])
        assert meta["step"] == STEPS and meta["seed"] == m.seed and meta["top_k"] == 4 and meta["points"] == 10
        assert stored["kernel"].dtype == torch.float32 and stored["eigenvectors"].shape == (10, 4)
        out = probe_output_fn(m.model, {"x": px, "y": py}, 10, "cpu", output=output)
        params = list(m.model.parameters())
        want, _ = entk(out.fn, out.n, params, weights=[0.05] * len(params))     # SGD lr 0.05: D = 0.05 I
        torch.testing.assert_close(stored["kernel"].double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        K, U = stored["kernel"].double(), stored["eigenvectors"].double()
        lam = torch.tensor(row["eigenvalues"][:4], dtype=torch.float64)
        torch.testing.assert_close(K @ U, U * lam, rtol=0, atol=1e-4 * float(lam[0]))   # top-4 eigenpairs
        np.testing.assert_array_equal(stored["labels"].numpy(), py[:10].numpy())
        assert set(row["task_power_by_class"]) == {str(c) for c in set(py[:10].tolist())}
        _, V = torch.linalg.eigh(want)
        off = task_power_by_class(V.flip(1), py[:10], sorted(set(py[:10].tolist())))
        for c, curve in row["task_power_by_class"].items():
            assert curve[-1] == pytest.approx(1.0)
            assert curve[:4] == pytest.approx(off[c][:4], abs=1e-3)


def test_reference_width_stopped_leaves_nothing_pending(tmp_path):
    """When every reference-width member is stopped (diverged), the narrower members' evaluations
    can no longer be compared: nothing waits for a reference forever, and one row says why."""
    cfg = make_cfg([8, 16], [0, 1], sharpness_iters=0, ntk_points=0)
    members = [Member(w, s, ToyMLP(6, w, 4, seed=s)) for w in (8, 16) for s in (0, 1)]
    px, py = teacher_data(40, seed=99)
    writer = ListWriter()
    mon = Monitor(cfg, tmp_path, members, {"x": px, "y": py}, writer, "cpu")
    mon.evaluate(0, 0)
    assert len(_rows(writer.rows, "consistency")) == 2 and not mon.pending
    for m in [m for m in members if m.width == 16]:
        m.step = 3
        mon.drop(m)
    skipped = _rows(writer.rows, "skipped")
    assert len(skipped) == 1 and "reference width 16" in skipped[0]["reason"] and skipped[0]["step"] == 3
    mon.evaluate(4, 4 * B)
    assert not mon.pending and len(_rows(writer.rows, "eval", step=4)) == 2
    assert not _rows(writer.rows, "consistency", step=4) and not _rows(writer.rows, "ensemble", step=4)
    before = len(writer.rows)
    other = Monitor(cfg, tmp_path / "b", list(members), {"x": px, "y": py}, ListWriter(), "cpu")
    other.drop(members[2], announce=False)        # a resume: the row was written when it diverged
    other.drop(members[3], announce=False)
    assert other.reference_lost and not _rows(other.writer.rows, "skipped") and len(writer.rows) == before
