"""µTransfer across depth on the demo GPT: η* per depth under each parameterization, and its drift.

    .venv/bin/python bench/depth_transfer.py train --out runs/depth-transfer   # one run per (kind, depth)
    .venv/bin/python bench/depth_transfer.py fit --out runs/depth-transfer [--md FILE]
    .venv/bin/python bench/depth_transfer.py train --lrs [0.0085,0.017] --tag _refine   # ×2^½ around η*
    .venv/bin/python bench/depth_transfer.py fit --tags _refine                         # on the union grid

`train`: for every kind and depth, one learning-rate sweep of the demo config at one width
(sweep.lrs × sweep.seeds, model.depth = d, param.base_depth = BASE_DEPTH) in OUT/KIND_dD; a run
already finished is kept. Until sweep.depths trains depths on one stream, the depths are separate
runs: each sees the same data stream and probe split (data.seed is fixed), so they are paired as a
depth sweep would pair them.

`fit`: the held-out probe losses at each run's last evaluation (per member and probe example, as
the report reads them: report/transfer.heldout_curves), stacked over depths into (depth, lr, seed,
example), and stats/transfer.transfer_fit with depth as the axis: η* per depth (parabola in log η
through the grid minimum), the slope of log η* on log depth with its 95% bootstrap interval over
seeds × examples, and the grid's resolution of that slope. Prints the report's markdown table
(report/transfer.depth_transfer_rows; --md: also writes it to FILE) and draws its figure (--figure).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE_DEPTH = 2
WIDTH = 64         # the demo's base width is 32: m_N = 2, so the width multipliers are on too
LRS = [0.0015, 0.003, 0.006, 0.012, 0.024, 0.048]   # ×2 steps from half the demo's 3e-3
STEPS = 80
EVERY = 40         # held-out probe evaluations at steps 40 and 80


def run_dir(out: Path, kind: str, depth: int, tag: str = "") -> Path:
    return out / f"{kind}_d{depth}{tag}"


def overrides(args, kind: str, depth: int) -> list[str]:
    return [f"model.width={args.width}", f"model.depth={depth}", f"param.kind={kind}", f"param.base_depth={BASE_DEPTH}",
            f"sweep.widths=[{args.width}]", f"sweep.lrs={args.lrs}", f"sweep.seeds={list(range(args.seeds))}",
            f"train.steps={args.steps}", f"stats.every={args.every}", "train.report=false", "train.threads=1",
            f"train.out_dir={run_dir(args.out, kind, depth, args.tag)}"]


def finished(d: Path, steps: int) -> bool:
    from fastwidth.run.metrics import read_metrics
    f = d / "metrics.jsonl"
    return f.exists() and any(r.get("kind") == "eval" and r.get("step") == steps for r in read_metrics(f))


def train(args) -> None:
    for kind in args.kinds:
        for depth in args.depths:
            d = run_dir(args.out, kind, depth, args.tag)
            if finished(d, args.steps):
                print(f"{d}: done, kept", flush=True)
                continue
            t0 = time.time()
            cmd = [sys.executable, "-m", "fastwidth", "train", "--config", "demo", "--set", *overrides(args, kind, depth)]
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            print(f"{d}: {time.time() - t0:.0f} s", flush=True)


def depth_losses(out: Path, kind: str, depths: list[int], tags: list[str]):
    """(lrs, losses (D, R, S, P)) of one kind: each depth's runs' held-out probe losses at their last
    evaluation, the learning rates of the runs `tags` (the grid, then refinements) merged."""
    from fastwidth.report.reader import load_run
    from fastwidth.report.transfer import _array, _evals, heldout_curves
    curves: dict = {}
    for depth in depths:
        for tag in tags:
            run = load_run(run_dir(out, kind, depth, tag))
            (only,) = heldout_curves(run, max(_evals(run))).values()   # one width per run
            curves.setdefault(depth, {}).update(only)
    depths_sorted, lrs, losses = _array(curves)
    assert depths_sorted == sorted(depths)
    return lrs, losses


def fits(args) -> list[tuple[str, dict]]:
    """(kind, transfer_fit across depth) per kind."""
    from fastwidth.stats.transfer import transfer_fit
    out = []
    for kind in args.kinds:
        lrs, losses = depth_losses(args.out, kind, args.depths, args.tags)
        out.append((kind, transfer_fit(lrs, args.depths, losses, n_boot=args.n_boot, axis="depth")))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["train", "fit"])
    p.add_argument("--out", type=Path, default=Path("runs/depth-transfer"))
    p.add_argument("--kinds", type=lambda s: s.split(","), default=["mup", "completep"])
    p.add_argument("--depths", type=lambda s: [int(v) for v in s.split(",")], default=[2, 4, 8])
    p.add_argument("--width", type=int, default=WIDTH)
    p.add_argument("--lrs", default=str(LRS).replace(" ", ""))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--every", type=int, default=EVERY)
    p.add_argument("--n-boot", type=int, default=400)
    p.add_argument("--tag", default="", help="train: suffix of the run directories (e.g. _refine with other --lrs)")
    p.add_argument("--tags", type=lambda s: [""] + [t for t in s.split(",") if t], default=[""],
                   help="fit: suffixes of further runs whose learning rates join the grid, e.g. _refine")
    p.add_argument("--md", type=Path, default=None, help="also write the table to this file")
    p.add_argument("--figure", type=Path, default=None, help="draw η* against depth (e.g. docs/results/transfer_depth.png)")
    args = p.parse_args()
    if args.action == "train":
        train(args)
        return
    from fastwidth.report.transfer import DEPTH_TABLE_HEAD, depth_transfer_rows, draw_transfer_depth
    found = fits(args)
    lines = DEPTH_TABLE_HEAD + depth_transfer_rows(found)
    print("\n".join(lines))
    if args.md:
        args.md.write_text("\n".join(lines) + "\n")
    if args.figure:
        draw_transfer_depth(found, args.figure)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
