"""Regenerate docs/results.md: run the science configs, report them, rewrite each section's block.

    make results                                          # every section (hours on 2 cores)
    python -m fastwidth.report.results --only transfer_wide,complexity
    python -m fastwidth.report.results --reuse --runs-dir runs/results   # report finished runs again

Each section of SECTIONS names its runs (a config and --set overrides each), trains every run into
RUNS_DIR/<section>/<label> (with --reuse a run directory holding a finished run is kept), reports
them into docs/results/<section>/ and rewrites the block between
`<!-- results:<section>:start -->` and `<!-- results:<section>:end -->` in docs/results.md: the
commands, each run's wall time and the machine's load, the report's tables and the figures. The
prose around the blocks (what the numbers mean) is written by hand and kept; a section without
markers is appended with them.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastwidth.report import spectral
from fastwidth.report.reader import load_run


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    runs: tuple[tuple[str, str, tuple[str, ...]], ...]     # (label, config, --set overrides)
    kind: str = "report"                                   # report | complexity
    tables: tuple[str, ...] = field(default=())            # summary.md headings copied into the block


FITS = "Fits at the final evaluation"                     # summary.md's fitted slopes (not a heading)
T1 = ("train.threads=1",)
FM = ("sweep.widths=[64,128,256,512]", "sweep.seeds=[0,1,2,3]") + T1
FM8 = ("sweep.widths=[64,128,256,512]", "sweep.seeds=[0,1,2,3,4,5,6,7]") + T1  # b² of the offline section: 4 seeds left it unresolved
FM_WIDE = ("sweep.widths=[64,128,256,512,1024,2048,4096,8192]", "sweep.seeds=[0,1,2,3]")  # two threads: 8192-wide GEMMs
CX_KNOBS = ("", "data.teacher_width=16", "data.teacher_width=256", "data.num_classes=2", "data.num_classes=40",
            "data.in_dim=8", "data.in_dim=128", "data.label_noise=0.2", "data.label_noise=0.5")
SECTIONS = (
    Section("fmnist", "µP and SP MLP on Fashion-MNIST", (
        ("fmnist_mup", "configs/fmnist_mlp.yaml", FM), ("fmnist_sp", "configs/fmnist_mlp.yaml", FM + ("param.kind=sp",)))),
    Section("demo", "The demo GPT, µP beside SP, slopes over training", (
        ("demo_mup", "configs/demo.yaml", T1 + ("stats.every=25",)),
        ("demo_sp", "configs/demo.yaml", T1 + ("stats.every=25", "param.kind=sp"))),
        tables=("Width slopes over training (slopes_vs_tokens.png)",)),
    Section("demo_heads", "The demo GPT: a fixed head count beside a fixed head_dim", (
        ("demo_mup_head_dim16", "configs/demo.yaml", T1 + ("stats.every=25",)),
        ("demo_mup_heads4", "configs/demo.yaml", T1 + ("stats.every=25", "model.n_heads=4"))),
        tables=("Width slopes over training (slopes_vs_tokens.png)",)),
    Section("fmnist_wide", "µP MLP on Fashion-MNIST to width 4096, an 8192 reference", (
        ("fmnist_mup_8192", "configs/fmnist_mlp.yaml", FM_WIDE),),
        tables=(FITS, "Width slopes over training (slopes_vs_tokens.png)")),
    Section("transfer_wide", "µTransfer on a held-out evaluation, widths 64-1024", (
        ("tr_mup_wide", "configs/transfer/fmnist_mlp_mup_wide.yaml", T1),), tables=("Learning-rate transfer",)),
    Section("transfer", "µTransfer, µP and SP, Fashion-MNIST and the demo GPT", (
        ("fmnist_mup", "configs/transfer/fmnist_mlp_mup.yaml", T1), ("fmnist_sp", "configs/transfer/fmnist_mlp_sp.yaml", T1),
        ("gpt_mup", "configs/transfer/gpt_mup.yaml", T1), ("gpt_sp", "configs/transfer/gpt_sp.yaml", T1)),
        tables=("Learning-rate transfer",)),
    Section("dynamics", "Edge of stability across widths", (
        ("gd_mup", "configs/dynamics/fmnist_mlp_gd_mup.yaml", T1),)),
    Section("complexity", "Bias against the task's complexity (teacher-student)", tuple(
        (k.replace("data.", "").replace("=", "_") or "base", "configs/complexity/teacher_student.yaml",
         T1 + ((k,) if k else ())) for k in CX_KNOBS), kind="complexity"),
    # the paper's figure types (issue 31; docs/paper.md shows each section's figures), one section each

    # -- offline --
    Section("offline", "Offline (a fixed 2048-image subset, cycled) against online, µP MLP on Fashion-MNIST", (
        ("online", "configs/paper/fmnist_offline.yaml", FM8 + ("data.train_size=0",)),
        ("offline_2048", "configs/paper/fmnist_offline.yaml", FM8)),
        tables=("Offline against online",)),

    # -- pointwise --
    Section("pointwise", "Point-wise true logits across widths, the demo GPT on a log schedule", (
        ("demo_mup_log", "configs/demo.yaml",
         T1 + ("stats.schedule=log", "stats.evals=20", "param.zero_readout=false")),),
        tables=("Point-wise true logits (pointwise.png)",)),

    # -- outputs --
    Section("outputs", "V_N for three outputs: raw, centered true logit and log p_y (the demo GPT)", (
        ("demo_mup", "configs/demo.yaml", T1),), tables=(FITS, "V_N for three outputs (vn_outputs.png)")),

    # -- spectral --
    Section("spectral", "The spectral mechanism where a bias exists (teacher-student, µP SGD)", (
        ("ntk_ts", "configs/paper/ntk_teacher_student.yaml", T1),), tables=(spectral.HEADING,)),

    # -- eos --
    Section("eos", "Edge of stability with seeds: GD onsets, plateaus and catapults; online Adam's preconditioned sharpness", (
        ("gd_mup", "configs/dynamics/fmnist_mlp_gd_mup_eos.yaml", T1),
        ("adam_online", "configs/dynamics/fmnist_mlp_adam_online.yaml", T1)),
        tables=("Edge of stability with seeds (eos_seeds.png)",)),

    # -- representations --
    Section("representations", "Representations and losses: class-sorted kernels, the loss gap, the coordinate check", (
        ("fmnist_mup", "configs/fmnist_mlp.yaml",
         FM + ("stats.every=47", "stats.coord_every=1", "stats.kernel_points=256")),),
        tables=("Loss gap to the reference width (loss_gap.png)",
                "Coordinate check from the run (coord_tp5.png, coord_in_loop.png)")),
)


def _finished(run_dir: Path) -> dict | None:
    try:
        rows = load_run(run_dir).rows("run")
    except Exception:                                          # noqa: BLE001 - absent or partial: train again
        return None
    return rows[-1] if rows else None


def _train(cfg: str, sets: tuple[str, ...], out: Path, reuse: bool) -> tuple[str, float]:
    cmd = ["fastwidth", "train", "--config", cfg, "--set", *sets, f"train.out_dir={out}", "train.report=false"]
    done = _finished(out) if reuse else None
    if done is None:
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "fastwidth.cli", *cmd[1:]], check=True)
        wall = time.time() - t0
    else:
        wall = float(done.get("wall_s") or float("nan"))
    return " ".join(cmd[:-2]), wall


def _summary_sections(summary: Path, headings: tuple[str, ...]) -> list[str]:
    text = summary.read_text() if summary.is_file() else ""
    out = []
    for h in headings:
        if h == FITS:  # the fits table under the report's header: its lead line and the table
            m = re.search(rf"^({re.escape(FITS)}.*?\n\n(?:\|.*\n)+)", text, re.M)
            if m:
                out += [m.group(1).strip(), ""]
            continue
        m = re.search(rf"^## {re.escape(h)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
        if m:
            out += [m.group(1).strip(), ""]
    return out


def _width_table(summary_json: Path) -> list[str]:
    """Per-width values with their 95% intervals over seeds, from summary.json."""
    import json
    if not summary_json.is_file():
        return []
    doc = json.loads(summary_json.read_text())
    ci = lambda v, c: "–" if v is None else f"{v:.3g}" + (f" [{c[0]:.3g}, {c[1]:.3g}]" if c else "")  # noqa: E731
    out = ["| run | width | true-logit RMSE | seed variance V_N | debiased b² |", "|---|---:|---|---|---|"]
    for run in doc.get("runs", []):
        for w in run["widths"]:
            if all(w.get(k) is None for k in ("true_logit_rmse", "seed_variance", "bias_sq_debiased")):
                continue                                       # a run without probe evaluations (stats off)
            out.append(f"| {run['run']['label']} | {w['width']}{' (ref)' if w['reference'] else ''} | "
                       f"{ci(w['true_logit_rmse'], w.get('true_logit_rmse_ci'))} | "
                       f"{ci(w['seed_variance'], w.get('seed_variance_ci'))} | "
                       f"{ci(w.get('bias_sq_debiased'), w.get('bias_sq_debiased_ci'))} |")
    return out + [""] if len(out) > 2 else []


def shown(path: Path, runs_dir: Path) -> str:
    """`path` as the block prints it: relative paths as given, an absolute one relative to the
    working directory when inside it, else as $RUNS/... (the block is committed: no machine path)."""
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return "$RUNS/" + str(path.relative_to(runs_dir))


def run_section(sec: Section, runs_dir: Path, docs: Path, reuse: bool) -> list[str]:
    """Train, report and return the section's generated markdown block."""
    dirs, lines = [], ["```"]
    for label, cfg, sets in sec.runs:
        out = runs_dir / sec.name / label
        cmd, wall = _train(cfg, sets, out, reuse)
        dirs.append(out)
        lines.append(f"{cmd} train.out_dir={shown(out, runs_dir)}   # {wall:.0f} s")
    out_dir = docs / "results" / sec.name
    if sec.kind == "complexity":
        from fastwidth.report.complexity import main as complexity_main
        complexity_main([*map(str, dirs), "-o", str(out_dir)])
        lines.append(f"python -m fastwidth.report.complexity {shown(runs_dir / sec.name, runs_dir)}/* -o "
                     f"{out_dir.relative_to(docs)}")
        body = (out_dir / "complexity.md").read_text().splitlines() + [""]
    else:
        from fastwidth.report.cli import make_report
        make_report(dirs, out_dir, allow_different_probes=True)  # "transfer": Fashion-MNIST beside the GPT
        shown_dirs = " ".join(shown(d, runs_dir) for d in dirs)
        lines.append(f"fastwidth report {shown_dirs} -o {out_dir.relative_to(docs)} --force "
                     f"--allow-different-probes")
        body = _summary_sections(out_dir / "summary.md", sec.tables) + _width_table(out_dir / "summary.json")
    load = os.getloadavg()[0]
    if any("$RUNS/" in line for line in lines):
        lines.insert(1, "# $RUNS: the --runs-dir these runs were trained in")
    lines += ["```", "", f"(generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; wall times on 2 cores, "
              f"load average {load:.1f} at the end)", ""] + body
    lines += [f"![{p.stem}](results/{sec.name}/{p.name})" for p in sorted(out_dir.glob("*.png"))]
    return lines


def write_block(doc: Path, sec: Section, block: list[str]) -> None:
    start, end = f"<!-- results:{sec.name}:start -->", f"<!-- results:{sec.name}:end -->"
    text = doc.read_text() if doc.is_file() else "# Results\n"
    new = f"{start}\n" + "\n".join(block) + f"\n{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: new, text, flags=re.S)
    else:
        text = text.rstrip("\n") + f"\n\n## {sec.title}\n\n{new}\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="regenerate docs/results.md from the science configs")
    p.add_argument("--only", default="", help="comma-separated section names (default: all)")
    p.add_argument("--runs-dir", default="runs/results")
    p.add_argument("--docs", default="docs")
    p.add_argument("--reuse", action="store_true", help="keep run directories that hold a finished run")
    p.add_argument("--list", action="store_true", help="print the sections and their runs, run nothing")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - {s.name for s in SECTIONS})
    if unknown:
        print(f"fastwidth results: unknown section(s) {unknown}; known: {[s.name for s in SECTIONS]}", file=sys.stderr)
        return 2
    chosen = [s for s in SECTIONS if not names or s.name in names]
    if args.list:
        for s in chosen:
            print(f"{s.name}: {s.title}: " + ", ".join(label for label, _, _ in s.runs))
        return 0
    docs = Path(args.docs)
    for s in chosen:
        write_block(docs / "results.md", s, run_section(s, Path(args.runs_dir), docs, args.reuse))
        print(f"{s.name}: block rewritten in {docs / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
