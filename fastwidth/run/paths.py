"""Every path of a run directory (train.out_dir), spelled here and nowhere else.

    run = RunDir(cfg.train.out_dir)
    run.metrics                          RUN/metrics.jsonl (docs/design.md §5)
    run.signature("w64_s0", 20)          RUN/signatures/w64_s0/step_00000020.safetensors
    run.list_signatures()                {"w64_s0": {20: path, ...}, ...}

The layout:
    config.yaml                 the resolved config
    metrics.jsonl               one JSON row a line (run/metrics.py)
    metrics.csv, tensorboard/   the same rows for other tools (train.csv, train.tensorboard)
    wandb/                      W&B's own run directories and wandb-core's log (train.wandb; the
                                name is wandb's: wandb.init(dir=RUN) writes RUN/wandb)
    signatures/<member>/        step_<step>.safetensors (a member's signature at an evaluation) and
                                ntk_step_<step>.safetensors (its eNTK), steps written with 8 digits
    checkpoints/                step_<step> (6 digits) per checkpoint, `latest` naming the newest
                                (the files inside one are run/checkpoint.py's format)
    probe.safetensors           the probe split every width and seed is evaluated on
    preact_ranges.json          the histogram bins the reference width's first evaluation set
    report/                     figures, summary.md, summary.json
    .lock                       the running process's flock (run/lock.py RunLock)
    .rank<r>/                   rank r's scratch copy of the layout (ranks other than 0 evaluate too)
"""
from __future__ import annotations

import re
from pathlib import Path

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
TENSORBOARD = "tensorboard"
WANDB = "wandb"
SIGNATURES = "signatures"
CHECKPOINTS = "checkpoints"
PROBE = "probe.safetensors"
RANGES = "preact_ranges.json"
REPORT = "report"
LOCK = ".lock"
SCRATCH = ".rank"
LATEST = "latest"            # inside checkpoints/: the name of the newest complete checkpoint

_SIGNATURE = re.compile(r"step_(\d+)\.safetensors")
_NTK = re.compile(r"ntk_step_(\d+)\.safetensors")


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint at `step` inside checkpoints/."""
    return f"step_{step:06d}"


def checkpoint_dirs(ckpt_root: Path) -> list[Path]:
    """The checkpoints in `ckpt_root`, oldest first (hidden set-aside or temporary ones left out)."""
    return sorted(p for p in Path(ckpt_root).glob("step_*") if p.is_dir())


def latest_pointer(ckpt_root: Path) -> Path:
    """The file naming the newest complete checkpoint of `ckpt_root`."""
    return Path(ckpt_root) / LATEST


def _entry(name: str, what: str) -> property:
    return property(lambda self: self.root / name, doc=f"RUN/{name}: {what}")


class RunDir:
    """One run directory; each property or method is one entry of the layout above."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    config = _entry(CONFIG, "the resolved config")
    metrics = _entry(METRICS, "the rows, one JSON object a line")
    metrics_csv = _entry(METRICS_CSV, "the rows in long format (train.csv)")
    tensorboard = _entry(TENSORBOARD, "the rows as TensorBoard scalars (train.tensorboard)")
    wandb = _entry(WANDB, "W&B's run directories (train.wandb)")
    signatures = _entry(SIGNATURES, "per member, its signatures and eNTK files")
    checkpoints = _entry(CHECKPOINTS, "one directory per checkpoint and `latest`")
    probe = _entry(PROBE, "the probe split")
    ranges = _entry(RANGES, "the preactivation histograms' bins")
    report = _entry(REPORT, "figures, summary.md, summary.json")
    lock = _entry(LOCK, "the running process's flock")

    @property
    def subdirs(self) -> tuple[Path, ...]:
        """The directories a run makes at its start (and a fresh start empties)."""
        return self.checkpoints, self.signatures, self.report

    def owns(self, path: str | Path) -> bool:
        """Whether `path` is one of this run's own entries or inside one: what only the run writes
        (config, rows, signatures, checkpoints, probe, ranges, tensorboard, lock, ranks' scratch).
        report/ is not among them: it is the report's place, rewritten by `fastwidth report`."""
        root, path = self.root.resolve(), Path(path).resolve()
        if path == root:
            return True
        if root not in path.parents:
            return False
        top = path.relative_to(root).parts[0]
        own = {CONFIG, METRICS, METRICS_CSV, TENSORBOARD, SIGNATURES, CHECKPOINTS, PROBE, RANGES, LOCK}
        return top in own or top.startswith(SCRATCH)

    def scratch(self, rank: int) -> "RunDir":
        """Rank `rank`'s scratch run directory inside this one (ranks other than 0 write there)."""
        return RunDir(self.root / f"{SCRATCH}{rank}")

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    def signature(self, member: str, step: int) -> Path:
        """Member `member`'s signature at `step`."""
        return self.signatures / member / f"step_{step:08d}.safetensors"

    def ntk(self, member: str, step: int) -> Path:
        """Beside the member's signatures: its eNTK at `step` (the kernel, fp32, and its top eigenvectors)."""
        return self.signatures / member / f"ntk_step_{step:08d}.safetensors"

    def list_signatures(self) -> dict[str, dict[int, Path]]:
        """{member name: {step: path}} for every signature stored (eNTK files are not signatures)."""
        return self._listed(_SIGNATURE)

    def list_ntk(self) -> dict[str, dict[int, Path]]:
        """{member name: {step: path}} for every eNTK stored."""
        return self._listed(_NTK)

    def _listed(self, name: re.Pattern) -> dict[str, dict[int, Path]]:
        out: dict[str, dict[int, Path]] = {}
        root = self.signatures
        for p in sorted(root.glob("*/*.safetensors")) if root.is_dir() else []:
            found = name.fullmatch(p.name)
            if found:
                out.setdefault(p.parent.name, {})[int(found.group(1))] = p
        return out
