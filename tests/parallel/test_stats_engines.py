"""Every statistic under every engine equals one process (docs/distributed.md: "a config valid in
one process never fails under a sharded engine"), on 2 CPU ranks (gloo).

One single-process run with every statistic on (probe and batch sharpness, eNTK, coord,
preactivation moments), then one launch per engine (ddp, fsdp2, HSDP, ZeRO-1/2/3, with and
without offload) of the same config; for every member and step each statistic must equal the
single process within its numerical tolerance: sharpness (both rows: Lanczos on the training
batch, all of it: sharpness_points 128 = 8 sequences of 16, so every rank count sees the same
examples) within 2% (far below the edge: 2% of 1% of its threshold), eNTK eigenvalues 1e-4 relative, coord rows and moments 1e-5. Batch
sharpness is over the global batch (each rank's HVP on its half, averaged), so the batch loss it
reports equals the single process's too. No row may be "skipped". The worst difference of each
statistic is printed per engine (pytest -s).
"""
import pytest
import yaml

from test_dist import ROOT, launch, launcher_of, losses, rewind, rows_of  # tests/parallel is on sys.path (rootdir import mode)

pytestmark = [pytest.mark.dist, pytest.mark.slow]

CONFIG = {"model": {"arch": "gpt", "depth": 1, "head_dim": 8}, "param": {"base_width": 16},
          "data": {"source": "stdlib", "seq_len": 16, "batch_size": 8, "probe_size": 8},
          "sweep": {"widths": [16, 32], "seeds": [0]},
          "train": {"steps": 4, "progress": False, "log_every": 1, "kernels": "torch", "report": False},
          "stats": {"every": 2, "sharpness_iters": 20, "sharpness_points": 128, "ntk_points": 4, "kernel_points": 16,
                    "batch_sharpness_every": 2, "batch_sharpness_iters": 20, "coord_every": 2}}
ENGINES = {"ddp": ["dist.backend=ddp"],
           "fsdp2": ["dist.backend=fsdp2"],
           "fsdp2_offload": ["dist.backend=fsdp2", "dist.offload_params=true"],
           "hsdp": ["dist.backend=fsdp2", "dist.replicate=2"],
           "zero1": ["dist.backend=deepspeed", "dist.zero_stage=1"],
           "zero2": ["dist.backend=deepspeed", "dist.zero_stage=2"],
           "zero3": ["dist.backend=deepspeed", "dist.zero_stage=3"],
           "zero3_offload": ["dist.backend=deepspeed", "dist.zero_stage=3", "dist.offload_params=true",
                             "dist.offload_optimizer=true"]}
# statistic -> (row kind, value keys, tolerance, floor). The error of a value u is |u - v| /
# max(|u|, floor), floor 1e-3 x the largest value of its row unless given: relative, except for
# values far below their row's scale (small eigenvalues), and for moments absolute below 1 (an
# excess kurtosis of 0.04 differs by 1e-6 when the batch's rows are summed in another order)
# Sharpness far below its edge (the row's threshold, where the optimizer turns unstable) is
# compared against 1% of that threshold: the finite-difference HVP (the GPT's attention has no
# double backward) has an absolute error floor, and a width-16 value of 0.027 under a threshold of
# 38 moved by 2.7% (7e-4, 2e-5 of the edge) between torch's Adam and DeepSpeed's CPU Adam on an
# AVX-512 machine. Within 2% relative at every value above 1% of the edge.
EDGE = "1% of threshold"
STATS = {"sharpness": ("sharpness", ("precond_sharpness",), 2e-2, EDGE),
         "batch sharpness": ("batch_sharpness", ("precond_sharpness",), 2e-2, EDGE),
         "batch loss": ("batch_sharpness", ("batch_loss",), 1e-5, None),
         "eNTK eigenvalues": ("ntk", ("eigenvalues",), 1e-4, None),
         "coord": ("coord", ("layers",), 1e-5, None),
         "moments": ("eval", ("preact",), 1e-5, 1.0)}


def by_key(run_dir, kind) -> dict:
    return {(r["width"], r["seed"], r["step"]): r for r in rows_of(run_dir, kind)}


def values(row: dict, key: str) -> list[float]:
    """The numbers of one statistic in a row, flattened in a fixed order."""
    v = row.get(key)
    if v is None:  # no moments at step 0 (no training batch yet)
        return []
    if key == "eigenvalues":
        return [float(x) for x in v]
    if isinstance(v, dict):  # {layer: {quantity: value}}
        return [float(q[k]) for l in sorted(v) for q in [v[l]] for k in sorted(q)
                if isinstance(q[k], (int, float)) and k != "out_of_range"]
    return [float(v)]


def worst(single, out, kind: str, keys: tuple, floor: float | str | None = None) -> float:
    a, b = by_key(single, kind), by_key(out, kind)
    assert a and set(a) == set(b), (kind, sorted(a), sorted(b))
    err, compared = 0.0, 0
    for k in a:
        for key in keys:
            x, y = values(a[k], key), values(b[k], key)
            assert len(x) == len(y), (kind, k, key)
            compared += len(x)
            if floor == EDGE:
                low = 1e-2 * abs(float(a[k]["threshold"]))
            else:
                low = floor if floor is not None else 1e-3 * max((abs(v) for v in x), default=0.0)
            for u, v in zip(x, y):
                err = max(err, abs(u - v) / max(abs(u), low, 1e-12))
    assert compared, (kind, "nothing compared")
    return err


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats_engines")
    cfg = {**CONFIG, "data": {**CONFIG["data"], "cache_dir": str(tmp / "cache")}}
    cfg_file = tmp / "stats.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    launch("python", ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={tmp / 'single'}"])
    return tmp, cfg_file, tmp / "single"


@pytest.mark.parametrize("engine", list(ENGINES))
def test_every_statistic_equals_one_process(work, engine):
    tmp, cfg_file, single = work
    out = tmp / engine
    backend = "zero" if "deepspeed" in ENGINES[engine][0] else engine
    launch(launcher_of(backend), ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={out}", *ENGINES[engine]])
    assert not rows_of(out, "skipped"), rows_of(out, "skipped")
    line = []
    for stat, (kind, keys, tol, floor) in STATS.items():
        err = worst(single, out, kind, keys, floor)
        line.append(f"{stat} {err:.1e}")
        assert err <= tol, (engine, stat, err)
    pre = {r["precond"] for r in rows_of(out, "batch_sharpness") if r["step"] > 0}
    assert pre == {"adam"}, (engine, pre)  # the engine's Adam state, not lr, after step 1
    print(f"\n{engine}: " + ", ".join(line))


def test_zero3_in_one_process_equals_the_plain_run(work):
    """Plain `python launch/train.py` with ZeRO-3 (a group of one): trains, evaluates (each block
    gathers as one unit) and computes every statistic as the run without an engine."""
    tmp, cfg_file, single = work
    out = tmp / "zero3_one"
    launch("python", ROOT / "launch" / "train.py", cfg_file,
           [f"train.out_dir={out}", "dist.backend=deepspeed", "dist.zero_stage=3"])
    for stat, (kind, keys, tol, floor) in STATS.items():
        assert worst(single, out, kind, keys, floor) <= tol, stat


def test_zero3_resumes_on_another_rank_count(work):
    """ZeRO-3 saved on 2 ranks resumes on 1 and saved on 1 resumes on 2 (DeepSpeed's universal
    checkpoint, converted at resume): the losses after the resume equal an uninterrupted run at the
    new rank count (within 1e-6 relative; measured: identical)."""
    tmp, cfg_file, _ = work
    sets = ["train.steps=8", "train.ckpt_every=4", "stats.enabled=false", "dist.backend=deepspeed", "dist.zero_stage=3"]
    straight = {}
    for world, how in ((2, "deepspeed"), (1, "python")):
        straight[world] = tmp / f"z3_{world}"
        launch(how, ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={straight[world]}", *sets])
    for old, new, how in ((2, 1, "python"), (1, 2, "deepspeed")):
        again = rewind(straight[old], tmp / f"z3_{old}to{new}", 4)
        launch(how, ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={again}", "train.resume=true", *sets])
        a, b = losses(straight[new]), losses(again)
        after = [k for k in a if k[1] > 4]
        assert after and set(a) == set(b)
        err = max(abs(a[k] - b[k]) / abs(a[k]) for k in after)
        print(f"\nZeRO-3 {old} -> {new} ranks: max relative loss difference after the resume {err:.1e}")
        assert err <= 1e-6
        assert not list((again / "checkpoints").glob(".universal-*")), "the conversion is removed after loading"
