"""The rows a process group writes equal one process's, ensembles included, on 2 CPU ranks (gloo).

A 3-seed Fashion-MNIST µP MLP sweep (widths 16 and 32, 4 steps, statistics every 2) is run in one
process, then under ddp and under fsdp2. Every eval, consistency, ensemble and fit row must
equal the single process's: the same rows, the same keys (so the ensemble rows carry their
ensemble_loss / ensemble_acc curves under a process group too: they are computed from the logits a
classifier's signature stores, which the probe evaluator gathers from every rank), and every
number within 1e-5 relative.

The floor: a value u is compared as |u - v| / max(|u|, FLOOR). The rows are functions of fp32
logits whose trajectories differ between the engines by fp32 rounding (the gradient all-reduce
sums in another order): ~1e-7 relative on a logit of O(1). A number that is a small difference
of such values (a bias of ~1e-3 between two ensemble means, a slope's lower bound near 0) keeps
that absolute error, not its relative size, so below FLOOR = 1e-3 the bound is absolute (1e-8).
The preactivation moments of an eval row are summed over the batch's rows in another order (each
rank's half, merged): skew and excess kurtosis are differences of standardized moments of scale 1,
so a skew of 0.01 carries an absolute error of 1e-7 (measured: 1.1e-7); like
tests/parallel/test_stats_engines.py, moments are compared absolutely below MOMENT_FLOOR = 1.
"""
from pathlib import Path

import pytest
import yaml

from test_dist import ROOT, launch, launcher_of, rows_of  # tests/parallel is on sys.path (rootdir import mode)

from fastwidth.data.images import FMNIST_DIR

pytestmark = [pytest.mark.dist, pytest.mark.slow,
              pytest.mark.skipif(not Path(FMNIST_DIR).is_dir(),
                                 reason=f"Fashion-MNIST is not installed at {FMNIST_DIR} (apt-get install -y dataset-fashion-mnist)")]

CONFIG = {"model": {"arch": "mlp", "depth": 2, "act": "relu"},
          "param": {"kind": "mup", "base_width": 16, "zero_readout": True},
          "optim": {"name": "adam", "lr": 1.0e-3},
          "data": {"source": "fmnist", "batch_size": 32, "probe_size": 64},
          "sweep": {"widths": [16, 32], "seeds": [0, 1, 2]},
          "train": {"steps": 4, "progress": False, "log_every": 1, "kernels": "torch", "report": False,
                    "threads": 1},
          "stats": {"every": 2, "kernel_points": 16, "sharpness_iters": 0, "ntk_points": 0}}
ENGINES = {"ddp": ["dist.backend=ddp"], "fsdp2": ["dist.backend=fsdp2"]}
KINDS = ("eval", "consistency", "ensemble", "fit")
TOL, FLOOR, MOMENT_FLOOR = 1e-5, 1e-3, 1.0


def keyed(run_dir: Path, kind: str) -> dict:
    """{(width, seed, step, ref): row} of one kind (ref: a consistency row's reference)."""
    return {(r["width"], r["seed"], r["step"], r.get("ref")): r for r in rows_of(run_dir, kind)}


def leaves(value, path=()):
    """(path, number or None) of every number in a row's value, nested dicts and lists flattened."""
    if isinstance(value, dict):
        for k in sorted(value):
            yield from leaves(value[k], path + (k,))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from leaves(v, path + (i,))
    elif value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def worst(single: Path, out: Path, kind: str) -> tuple[float, tuple, int]:
    """The largest error over every number of `kind` rows, where it is, and how many numbers were compared."""
    a, b = keyed(single, kind), keyed(out, kind)
    assert a and set(a) == set(b), (kind, sorted(set(a) ^ set(b)))
    err, where, compared = 0.0, (), 0
    for k, row in a.items():
        assert set(row) == set(b[k]), (kind, k, sorted(set(row) ^ set(b[k])))
        x, y = dict(leaves(row)), dict(leaves(b[k]))
        assert set(x) == set(y), (kind, k, sorted(set(x) ^ set(y)))
        for path, u in x.items():
            v = y[path]
            assert (u is None) == (v is None), (kind, k, path, u, v)
            if u is not None:
                e = abs(u - v) / max(abs(u), MOMENT_FLOOR if path[0] == "preact" else FLOOR)
                err, where = max((err, where), (e, (k, path, u, v)))
                compared += 1
    return err, where, compared


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rows_parity")
    cfg_file = tmp / "fmnist.yaml"
    cfg_file.write_text(yaml.safe_dump({**CONFIG, "data": {**CONFIG["data"], "cache_dir": str(tmp / "cache")}}))
    launch("python", ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={tmp / 'single'}"])
    single = tmp / "single"
    curves = [r for r in rows_of(single, "ensemble") if r["step"] > 0]
    assert curves and all(len(r["ensemble_loss"]) == 3 and len(r["ensemble_acc"]) == 3 for r in curves)
    return tmp, cfg_file, single


@pytest.mark.parametrize("engine", list(ENGINES))
def test_rows_equal_one_process(work, engine):
    tmp, cfg_file, single = work
    out = tmp / engine
    launch(launcher_of(engine), ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={out}", *ENGINES[engine]])
    line = []
    for kind in KINDS:
        err, where, compared = worst(single, out, kind)
        line.append(f"{kind} {err:.1e} ({compared} numbers)")
        assert err <= TOL, (engine, kind, err, where)
    print(f"\n{engine}: " + ", ".join(line))
