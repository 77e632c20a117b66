"""Every statistic under every engine equals one process (docs/distributed.md: "a config valid in
one process never fails under a sharded engine"), on 2 CPU ranks (gloo).

One single-process run with every statistic on (probe and batch sharpness, eNTK, coord,
preactivation moments), then one launch per engine (ddp, fsdp2, HSDP, ZeRO-1/2/3, with and
without offload) of the same config; for every member and step each statistic must equal the
single process within its numerical tolerance: sharpness (power iteration / Lanczos to relative
change 1e-3) within 2%, eNTK eigenvalues 1e-4 relative, coord rows and moments 1e-5. Batch
sharpness is over the global batch (each rank's HVP on its half, averaged), so the batch loss it
reports equals the single process's too. No row may be "skipped". The worst difference of each
statistic is printed per engine (pytest -s).
"""
import pytest
import yaml

from test_dist import ROOT, launch, launcher_of, rows_of  # tests/parallel is on sys.path (rootdir import mode)

pytestmark = [pytest.mark.dist, pytest.mark.slow]

CONFIG = {"model": {"arch": "gpt", "depth": 1, "head_dim": 8}, "param": {"base_width": 16},
          "data": {"source": "stdlib", "seq_len": 16, "batch_size": 8, "probe_size": 8},
          "sweep": {"widths": [16, 32], "seeds": [0]},
          "train": {"steps": 4, "progress": False, "log_every": 1, "kernels": "torch", "report": False},
          "stats": {"every": 2, "sharpness_iters": 20, "sharpness_points": 16, "ntk_points": 4, "kernel_points": 16,
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
# statistic -> (row kind, value keys, relative tolerance)
STATS = {"probe sharpness": ("sharpness", ("precond_sharpness",), 2e-2),
         "batch sharpness": ("batch_sharpness", ("precond_sharpness",), 2e-2),
         "batch loss": ("batch_sharpness", ("batch_loss",), 1e-5),
         "eNTK eigenvalues": ("ntk", ("eigenvalues",), 1e-4),
         "coord": ("coord", ("layers",), 1e-5),
         "moments": ("eval", ("preact",), 1e-5)}


def by_key(run_dir, kind) -> dict:
    return {(r["width"], r["seed"], r["step"]): r for r in rows_of(run_dir, kind)}


def values(row: dict, key: str) -> list[float]:
    """The numbers of one statistic in a row, flattened in a fixed order."""
    v = row[key]
    if key == "eigenvalues":
        return [float(x) for x in v]
    if isinstance(v, dict):  # {layer: {quantity: value}}
        return [float(q[k]) for l in sorted(v) for q in [v[l]] for k in sorted(q)
                if isinstance(q[k], (int, float)) and k != "out_of_range"]
    return [float(v)]


def worst(single, out, kind: str, keys: tuple, top: int | None = None) -> float:
    a, b = by_key(single, kind), by_key(out, kind)
    assert a and set(a) == set(b), (kind, sorted(a), sorted(b))
    err = 0.0
    for k in a:
        for key in keys:
            x, y = values(a[k], key), values(b[k], key)
            assert len(x) == len(y), (kind, k, key)
            scale = max(abs(v) for v in x) or 1.0  # eigenvalues far below the top: relative to the top one
            for u, v in list(zip(x, y))[:top]:
                err = max(err, abs(u - v) / max(abs(u), 1e-3 * scale, 1e-12))
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
    for stat, (kind, keys, tol) in STATS.items():
        err = worst(single, out, kind, keys)
        line.append(f"{stat} {err:.1e}")
        assert err <= tol, (engine, stat, err)
    pre = {r["precond"] for r in rows_of(out, "batch_sharpness") if r["step"] > 0}
    assert pre == {"adam"}, (engine, pre)  # the engine's Adam state, not lr, after step 1
    print(f"\n{engine}: " + ", ".join(line))
