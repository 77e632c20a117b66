"""One checkpointer: every member through the run's engine, and the state of every component that
registered with it, in one checkpoint directory written atomically.

    check_resumable(cfg, world_size)                   # before any engine: what DeepSpeed cannot load
    checkpointer = Checkpointer(cfg, placement.main, members, ckpt_root)
    checkpointer.register("data", stream)              # anything with state_dict / load_state_dict
    checkpointer.register("rng", RNG)
    path = checkpointer.save(final=False)              # collective: every rank, at the same step
    checkpointer.load_members(meta)                    # resuming: every member from its engine
    checkpointer.load_state(meta)                      # then every component, in registration order

A component's state is meta.json's entry under its key ("data", "rng", "sweep", "stats"), beside
the config, the µP tables and `final`. The members' tensors are the engine's (Engine.save / load,
parallel/checkpoints.py: the single-process format of run/checkpoint.py where every rank holds
each member whole, else each member written by its own engine), so the checkpointer never asks
which engine it drives.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastwidth.param.scaling import table_rows
from fastwidth.run import checkpoint as ckpt
from fastwidth.run.paths import checkpoint_name
from fastwidth.run.writes import writing
from fastwidth.trainer.engine_checkpoint import check_resumable  # noqa: F401 (public here)


@dataclass(frozen=True)
class State:
    """A component's checkpoint state given as two functions, for state that is not one object's."""

    state_dict: Callable[[], dict]
    load_state_dict: Callable[[dict], None]


RNG = State(ckpt.rng_state, ckpt.set_rng_state)  # torch's generators (fastwidth draws from no other)


class Checkpointer:
    """Saves and restores a run into `root` (RUN/checkpoints). members: the trainer's list of
    members (the refinement pass extends it in place); engine: the run's main engine
    (Placement.main), which decides the format."""

    def __init__(self, cfg, engine, members: list, root: Path):
        self.cfg, self.engine, self.members = cfg, engine, members
        self.root = Path(root)
        self.components: dict[str, object] = {}

    def register(self, key: str, component) -> None:
        """Save `component.state_dict()` under `key` of every checkpoint; load_state gives it back."""
        self.components[key] = component

    def slowest_step(self) -> int:
        """The step of the member furthest behind (stopped members included)."""
        return min(m.step for m in self.members)

    # ------------------------------------------------------------------ save

    def save(self, final: bool) -> Path:
        """Checkpoint step_<step> (step: the slowest member still training) of every member and
        component; `final`: the run has ended. Collective. Returns its path."""
        step = min((m.step for m in self.members if m.diverged is None), default=self.cfg.train.steps)
        extra = {"config": self.cfg.to_dict(),
                 "mup_tables": {m.name: table_rows(m.table) for m in self.members}, "final": final,
                 **{key: c.state_dict() for key, c in self.components.items()}}
        # a full disk: the half-written .tmp-step_* goes, the last whole checkpoint stays. Only a
        # failed write (every rank raises it once they agree: parallel/checkpoints.py): a rank lost
        # mid-save or a second Ctrl-C leaves the hidden directory to the next start's
        # clear_interrupted, since another rank may still be writing into it
        try:
            with writing(self.root / checkpoint_name(step)):  # safetensors' I/O error as an OSError
                return self.engine.save(self.root, step, self.members, extra, keep=self.cfg.train.keep_checkpoints)
        except OSError:
            ckpt.clear_interrupted(self.root)
            raise

    # ------------------------------------------------------------------ restore

    def load_members(self, meta: dict) -> None:
        """Every member's model and optimizer, and its step, from the latest checkpoint (meta:
        its ckpt.read_checkpoint); refused with one line when the run's engine cannot load it, or
        when it holds a file that needs unpickling and train.trust_checkpoint is off."""
        path = ckpt.latest_checkpoint(self.root)
        ckpt.refuse_unpicklable(path, self.cfg.train.trust_checkpoint, meta)  # before any engine's loader
        self.engine.load(self.members, meta, path)

    def load_state(self, meta: dict) -> None:
        """Every registered component's state from checkpoint meta, in the order they registered
        (a component the checkpoint holds nothing for keeps its fresh state)."""
        for key, component in self.components.items():
            if key in meta:
                component.load_state_dict(meta[key])
