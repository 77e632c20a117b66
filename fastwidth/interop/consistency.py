"""The consistency statistics inside someone else's training loop: rows, signatures and a report
like a fastwidth run's, from models the user built and trains.

    c = fastwidth.Consistency({"small": (m64, 64, 0), "big": (m256, 256, 0), ...}, probe=(x, y),
                              run_dir="runs/mine", steps=1000, every=100)
    c.evaluate(0)                                  # before training (every member); it also sets the
                                                   # preactivation histograms' bins, as a run's step 0
    for step, batch in enumerate(loader, 1):       # the user's loop: every member on the batch
        ...                                        # forward, backward, optimizer steps
        c.after_step(step, batch, loss={"small": l1, "big": l2})
    c.report()                                     # RUN/report/ (fastwidth report RUN works too)

`after_step` evaluates the probe at the steps of stats/schedule.py (stats.every / stats.schedule,
the last step always) and accumulates the training batch's preactivations. The cheapest way to
give it those is to wrap the member's own forward and backward in `with c.training(name):` (the
callbacks do: no extra compute); a batch handed to after_step instead costs one no-grad forward
of that batch (the weights after the step, not before it).

What runs is fastwidth's own: the Monitor (stats/monitor.py) with its one probe evaluator
(stats/signature.py probe_signature), member names from run/members.py MemberSpec, paths from
run/paths.py RunDir, rows through run/metrics.py. Models are wrapped in models/user.py UserModel,
which shares the user's parameters and modules: feature points are the blocks of the biggest
ModuleList and, where a readout is found, its input; preactivation points are the widening input
and hidden linear layers. Which layers those are is read from the shapes across the given widths
(models/user.py infer_roles, as mup's set_base_shapes reads them): only the roles, no µP is
applied to anything. With one width, or a family whose roles cannot be read (the reason is
logged), the members keep the block features and have no preactivation points.

Steps line up by count: every member is evaluated after its own optimizer step s, and the rows
compare members at equal s, so give every member the same batches in the same order (one
dataset, one batch size, one data-order seed); the members may train together or one after
another (the comparisons wait until the reference width's signature at s exists, as in a
sequential fastwidth sweep). Not measured here: sharpness and the eNTK (they need the member's
optimizer), the learning rate and the optimizer, which are the user's loop's (config.yaml's optim
section holds fastwidth's defaults, not the user's settings).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastwidth.config import Config, from_dict
from fastwidth.errors import ConfigError, UserError
from fastwidth.models.user import UserModel, infer_roles, readout_module
from fastwidth.run import MemberSpec, RunDir
from fastwidth.run.metrics import MetricsWriter
from fastwidth.run.prepare import prepare_run_dir
from fastwidth.stats.monitor import Monitor
from fastwidth.stats.schedule import EvalSchedule

log = logging.getLogger("fastwidth.interop")


@dataclass
class Member:
    """What the Monitor reads of a member (trainer/members.py Member's statistics part)."""
    width: int
    seed: int
    model: UserModel
    user_name: str
    step: int = 0
    table: dict = field(default_factory=dict)   # no µP table: param_count counts the parameters

    @property
    def name(self) -> str:
        return MemberSpec(self.width, None, self.seed).name


def _probe(probe) -> tuple[dict, dict]:
    """({x, y}, the data section to record) from (x, y), {x, y}, a stream, a Config or a data section."""
    from fastwidth.data import build_stream
    if isinstance(probe, (tuple, list)) and len(probe) == 2:
        return {"x": probe[0], "y": probe[1]}, {}
    if isinstance(probe, dict) and "x" in probe and "y" in probe:
        return {"x": probe["x"], "y": probe["y"]}, {}
    if callable(getattr(probe, "probe", None)):
        return probe.probe(), {}
    if isinstance(probe, dict):  # a data section
        probe = from_dict({"data": probe})
    if isinstance(probe, Config):
        return build_stream(probe.data).probe(), probe.to_dict()["data"]
    raise UserError(f"probe {type(probe).__name__}: give (x, y) tensors, a dict with x and y, a fastwidth "
                    f"stream, a Config or a data section (e.g. {{'source': 'fmnist'}})")


def _members(models: dict) -> list[Member]:
    """Members from {name: (model, width, seed)}, roles read across the widths where they can be."""
    out = []
    for name, entry in models.items():
        if not (isinstance(entry, (tuple, list)) and len(entry) == 3 and isinstance(entry[0], nn.Module)):
            raise UserError(f"models[{name!r}]: give (nn.Module, width, seed), not {entry!r:.60}")
        model, width, seed = entry
        out.append(Member(int(width), int(seed), model, str(name)))
    seen: dict[str, str] = {}
    for m in out:
        if m.name in seen:
            raise UserError(f"models {seen[m.name]!r} and {m.user_name!r} are both width {m.width}, seed {m.seed}: "
                            f"each (width, seed) is one member")
        seen[m.name] = m.user_name
    widths = sorted({m.width for m in out})
    by_width = {w: next(m.model for m in out if m.width == w) for w in widths}
    for m in out:
        specs = {}
        if len(widths) >= 2:
            try:
                specs = infer_roles(m.model, by_width[widths[0]], by_width[widths[1]])
            except ConfigError as e:
                log.warning("%s: layer roles not read (%s); its statistics keep the block features and "
                            "no preactivations", m.user_name, e)
        m.model = UserModel(m.model, specs, readout_module(m.model, specs) if specs else None)
    return out


def _config(members: list[Member], run_dir, steps: int, reference_width: int, data: dict, stats: dict,
            kind: str) -> Config:
    ref = reference_width or max(m.width for m in members)
    head = next(m for m in members if m.width == ref)
    return from_dict({
        "param": {"kind": kind},
        "model": {"arch": "python", "width": ref, "factory": f"<python>:{type(head.model.inner).__name__}"},
        "sweep": {"widths": sorted({m.width for m in members}), "seeds": sorted({m.seed for m in members}),
                  "reference_width": ref},
        "train": {"steps": int(steps), "out_dir": str(run_dir), "progress": False},
        "data": data,
        "stats": {"sharpness_iters": 0, "ntk_points": 0, **stats}}, name="consistency")  # both need the optimizer


def _inputs(batch):
    """A batch's model input: x of (x, y), a dict's input_ids / x, or the tensor itself."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("input_ids", "x", "pixel_values", "inputs"):
            if key in batch:
                return batch[key]
        raise UserError(f"after_step: a dict batch needs input_ids or x (has {sorted(batch)})")
    return batch


def _targets(batch) -> int:
    """Targets in a batch: y's (labels') elements, else its examples."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and torch.is_tensor(batch[1]):
        return batch[1].numel()
    if isinstance(batch, dict) and torch.is_tensor(batch.get("labels")):
        return batch["labels"].numel()
    return int(_inputs(batch).shape[0])


class Consistency:
    """fastwidth's consistency statistics for models trained by another loop.

    Inputs: models {name: (nn.Module returning logits, width, seed)}; probe (x, y) tensors (y the
    target of every logit position: a class per example, or the next token per position), a
    stream, a Config or a data section (its probe split); run_dir; steps: the optimizer steps each
    member trains (the schedule's last evaluation; a callback sets it from its trainer when None);
    every / schedule / evals: stats.every, stats.schedule, stats.evals; reference_width (0: the
    widest); tokens_per_step (None: the targets of the first batch after_step gets; until one
    is seen, tokens count steps); stats: more
    stats.* keys; overwrite: replace a run already in run_dir; report: write the report when the
    last member finishes (finish(), which the callbacks call at their train end); kind: the
    parameterization the models were built with, as the report labels the run (param.kind; sp,
    the default, is PyTorch's and transformers' own init: nothing here applies or checks it).
    Outputs: RUN/config.yaml, metrics.jsonl (eval, consistency, ensemble, fit, train, run rows),
    signatures/<member>/step_N.safetensors, probe.safetensors and, from report(), RUN/report/.
    """

    def __init__(self, models: dict, probe, run_dir, *, steps: int | None = None, every: int = 50,
                 schedule: str = "linear", evals: int = 24, reference_width: int = 0,
                 tokens_per_step: int | None = None, stats: dict | None = None, overwrite: bool = False,
                 report: bool = True, kind: str = "sp"):
        if not models:
            raise UserError("Consistency: give at least one model as {name: (model, width, seed)}")
        self.members = _members(models)
        self.by_user = {m.user_name: m for m in self.members}
        self.probe, self._data = _probe(probe)
        self.run_dir = Path(run_dir)
        if RunDir(self.run_dir).metrics.exists() and not overwrite:
            raise UserError(f"run directory {self.run_dir} already holds a run; pick another or pass overwrite=True")
        self._stats = {"every": int(every), "schedule": schedule, "evals": int(evals), **(stats or {})}
        self.reference_width = int(reference_width)
        if self.reference_width and self.reference_width not in {m.width for m in self.members}:
            raise UserError(f"reference_width {reference_width} is none of the members' widths "
                            f"{sorted({m.width for m in self.members})}")
        self.tokens_per_step = tokens_per_step
        self.report_at_end = report
        self.kind = kind
        self.monitor: Monitor | None = None
        self.writer: MetricsWriter | None = None
        self._armed: dict[str, contextlib.AbstractContextManager] = {}
        self._observed: set[str] = set()       # members whose training forward the hooks saw this step
        self._done: set[str] = set()
        self._t0 = time.time()
        self._steps = None
        if steps is not None:
            self.steps = steps
        _config(self.members, self.run_dir, steps or 1, self.reference_width, self._data, self._stats, kind)  # a bad key: one line now

    # ------------------------------------------------------------------ set-up
    @property
    def steps(self) -> int | None:
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        if self.monitor is not None and int(value) != self._steps:
            raise UserError(f"Consistency: steps is {self._steps} and the statistics have started; a second "
                            f"trainer with {value} steps cannot join (give every member the same steps)")
        if int(value) < 1:
            raise UserError(f"Consistency: steps={value}; give the optimizer steps each member trains (>= 1)")
        self._steps = int(value)

    def _start(self) -> Monitor:
        """The run directory, config.yaml, probe and the Monitor, at the first evaluation or step."""
        if self.monitor is not None:
            return self.monitor
        if self._steps is None:
            raise UserError("Consistency: steps is not set; pass steps= (the optimizer steps each member trains)")
        self.cfg = _config(self.members, self.run_dir, self._steps, self.reference_width, self._data, self._stats,
                           self.kind)
        self.schedule = EvalSchedule.from_config(self.cfg)
        prepare_run_dir(self.cfg, None)  # config.yaml, emptied subdirectories
        from safetensors.torch import save_file
        save_file({"x": self.probe["x"].contiguous(), "y": self.probe["y"].contiguous()},
                  str(RunDir(self.run_dir).probe), metadata={"source": "Consistency"})
        self.writer = MetricsWriter(RunDir(self.run_dir).metrics)
        self.monitor = Monitor(self.cfg, self.run_dir, self.members, self.probe, self.writer, self._device())
        return self.monitor

    def _device(self, members: list[Member] | None = None) -> torch.device:
        p = next((p for m in members or self.members for p in m.model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    def member(self, name: str) -> Member:
        if name not in self.by_user:
            raise UserError(f"Consistency has no member {name!r}; members: {', '.join(self.by_user)}")
        return self.by_user[name]

    def _pick(self, names) -> list[Member]:
        return list(self.members) if names is None else [self.member(n) for n in ([names] if isinstance(names, str) else names)]

    def tokens(self, step: int) -> int:
        """The rows' tokens at `step`: step × tokens_per_step (steps themselves while no batch was seen)."""
        return step * (self.tokens_per_step or 1)

    # ------------------------------------------------------------------ the loop's calls
    @contextlib.contextmanager
    def training(self, name: str):
        """Around member `name`'s training forward (and backward): its preactivations are accumulated
        from that forward (stats.preact_every), at no extra compute."""
        self.arm(name)
        try:
            yield
        finally:
            self.disarm(name)

    def arm(self, name: str) -> None:
        """Start observing `name`'s forwards (a callback's step-begin); disarm(name) ends it."""
        m = self.member(name)
        if self._armed:
            raise UserError(f"Consistency: {name} starts a step while {next(iter(self._armed))} is inside one; "
                            f"members' steps take turns in one process")
        cm = self._start().training(m)
        cm.__enter__()
        self._armed[name] = cm
        self._observed.add(name)

    def disarm(self, name: str) -> None:
        cm = self._armed.pop(name, None)
        if cm is not None:
            cm.__exit__(None, None, None)

    def after_step(self, step: int, batch=None, loss=None, members=None) -> None:
        """After optimizer step `step` (1, 2, ...) of `members` (default all; a name or a list): the
        training batch's preactivations (a no-grad forward of `batch` unless training() saw the
        forward), a train row per member when `loss` is given (a number, or {name: number}), and the
        probe evaluation when the schedule has `step`."""
        mon = self._start()
        ms = self._pick(members)
        if self.tokens_per_step is None and batch is not None:
            self.tokens_per_step = _targets(batch)
        for m in ms:
            m.step = step
            if m.user_name not in self._observed and batch is not None and self.cfg.stats.preact:
                with torch.no_grad(), mon.training(m):
                    x = _inputs(batch)
                    m.model(x.to(self._device([m])) if torch.is_tensor(x) else x)
            self._observed.discard(m.user_name)
            value = loss.get(m.user_name) if isinstance(loss, dict) else loss
            if value is not None:
                self.log_train(m.user_name, step, float(value))
        if self.schedule.due(step):
            self.evaluate(step, [m.user_name for m in ms])

    def log_train(self, name: str, step: int, loss: float, **extra) -> None:
        m = self.member(name)
        self._start()
        self.writer.write({"kind": "train", "step": step, "tokens": self.tokens(step), "width": m.width,
                           "seed": m.seed, "loss": float(loss), **extra})

    def evaluate(self, step: int, members=None) -> None:
        """The probe evaluation of `members` (default all) at `step`: signatures, eval rows and every
        consistency / ensemble / fit row whose signatures now exist."""
        mon = self._start()
        ms = self._pick(members)
        mon.device = self._device(ms)
        modes = [(m, m.model.inner.training) for m in ms]
        for m, mode in modes:
            m.model.training = mode   # probe_signature restores the mode it finds
        with mon.paused():
            mon.evaluate(step, self.tokens(step), ms)
        for m, mode in modes:
            m.model.train(mode)

    def finish(self, name: str) -> Path | None:
        """Member `name` has trained to the end; when every member has, the report (its summary.md;
        None with report=False: call report() when you want it)."""
        self._done.add(self.member(name).user_name)
        left = [n for n in self.by_user if n not in self._done]
        if left:
            log.info("Consistency: %s done; the report waits for %s", name, ", ".join(left))
            return None
        return self.report() if self.report_at_end else None

    def report(self) -> Path:
        """Write the last rows and RUN/report/ (figures, summary.md, summary.json) as a fastwidth
        run ends (report/headline.py report_at_end); returns summary.md."""
        from fastwidth.report.headline import report_at_end
        mon = self._start()
        mon.flush_pending()
        step = max(m.step for m in self.members)
        self.writer.write({"kind": "run", "step": step, "tokens": self.tokens(step), "width": 0, "seed": 0,
                           "wall_s": time.time() - self._t0, "models": len(self.members), "diverged": 0,
                           "loop": "Consistency", "data_source": self._data.get("source", "probe tensors")})
        self.close()
        return report_at_end(self.run_dir)

    def close(self) -> None:
        """Remove the hooks and close metrics.jsonl (report() does it)."""
        for name in list(self._armed):
            self.disarm(name)
        if self.monitor is not None:
            self.monitor.close()
        if self.writer is not None:
            self.writer.close()

