"""The online stream: which examples a step serves, and the two stream kinds built on it.

Every batch is a pure function of (data.seed, step, rank, world_size):

    global batch of step s = order_e[(s mod S) * B : (s mod S + 1) * B],  e = s // S
    rank r serves rows [r * b, (r + 1) * b) of it,  b = B / world_size

where S = n_train // B steps fit one pass and order_e is a seeded permutation of the training
examples for epoch e (a token window is an "example" for text). Offline (data.train_size = K > 0,
BaseStream.restrict) the subset is the first K examples of the online order, cycled in one fixed
order for every member, width, seed and rank layout:

    global batch of step s = subset[(s * B + j) mod K],  j < B,  subset = order_0[:K]

so with K >= steps * B the run serves the online batches exactly. Inside one epoch no example is
served twice; the union over ranks is the single-process batch. The probe split is a fixed set
of held-out examples chosen without any seed, so every width, init seed and data seed sees the
same probe (the fingerprint says so).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fastwidth.errors import DataError

log = logging.getLogger("fastwidth.data")

# Mixed into every SeedSequence so data RNG streams never collide with other users of the seed.
_ORDER_TAG = 0x0DA7A
_PROBE_SPACING = "evenly-spaced"


def seed_sequence(seed: int, *words: int) -> np.random.SeedSequence:
    """SeedSequence from a (possibly negative) user seed and extra words."""
    return np.random.SeedSequence([seed % (1 << 64), *[w % (1 << 64) for w in words]])


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def cache_root(cfg_data) -> Path:
    """data.cache_dir, or ~/.cache/fastwidth (tokens, image statistics, decoded folders)."""
    return Path(cfg_data.cache_dir).expanduser() if cfg_data.cache_dir else Path.home() / ".cache" / "fastwidth"


def check_ranks(batch_size: int, rank: int, world_size: int) -> int:
    """This rank's share b of the global batch; error when the batch does not split evenly."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"data: rank {rank} is not in [0, world_size={world_size})")
    if batch_size % world_size:
        raise DataError(f"data.batch_size {batch_size} is not divisible by the {world_size} data-parallel ranks")
    return batch_size // world_size


class Sampler:
    """Seeded epoch orders over n training examples, cut into global batches and rank slices.

    `blocks` (sizes summing to n) keeps each block contiguous in the order: the block order and
    the order inside each block are permuted, so a reader that streams one block (an npz part)
    at a time touches at most two blocks per batch. Without blocks the order is one permutation.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, epochs: int, rank: int = 0,
                 world_size: int = 1, blocks: Sequence[int] | None = None, what: str = "examples",
                 source: str = "data"):
        self.n, self.batch_size, self.seed, self.epochs = int(n), int(batch_size), int(seed), int(epochs)
        self.rank, self.world_size = rank, world_size
        self.local = check_ranks(batch_size, rank, world_size)
        self.blocks = [int(b) for b in blocks] if blocks else [self.n]
        assert sum(self.blocks) == self.n, (self.blocks, self.n)
        self.what, self.source = what, source
        self.steps_per_epoch = self.n // self.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"{source}: the training split holds {self.n} {what}, fewer than one batch of "
                            f"data.batch_size={batch_size}")
        self.steps_available = self.steps_per_epoch * self.epochs
        self._order_epoch, self._order = -1, None
        self._warned = False

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of training example ids for one epoch (cached for the current one)."""
        if epoch != self._order_epoch:
            rng = np.random.Generator(np.random.PCG64(seed_sequence(self.seed, _ORDER_TAG, epoch)))
            dtype = np.int32 if self.n < 2**31 else np.int64
            if len(self.blocks) == 1:
                order = rng.permutation(self.n).astype(dtype)
            else:
                starts = np.concatenate([[0], np.cumsum(self.blocks)[:-1]])
                order = np.concatenate([starts[k] + rng.permutation(self.blocks[k]).astype(dtype)
                                        for k in rng.permutation(len(self.blocks))])
            self._order_epoch, self._order = epoch, order
        return self._order

    def global_indices(self, step: int) -> np.ndarray:
        if step < 0:
            raise DataError(f"{self.source}: step {step} is negative")
        if step >= self.steps_available:
            more = "" if self.epochs > 1 else " or set data.epochs > 1 to repeat it"
            raise DataError(
                f"{self.source}: the training split holds {self.n} {self.what} = {self.steps_per_epoch} steps of "
                f"data.batch_size={self.batch_size} per pass, {self.steps_available} steps in data.epochs="
                f"{self.epochs}; step {step} asked: lower train.steps, use a larger corpus{more}")
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch > 0 and not self._warned:
            self._warned = True
            log.warning("%s: starting pass %d over the training split (data.epochs=%d): examples now repeat",
                        self.source, epoch + 1, self.epochs)
        return self.order(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]

    def indices(self, step: int) -> np.ndarray:
        """This rank's rows of the global batch of `step`."""
        g = self.global_indices(step)
        return g[self.rank * self.local:(self.rank + 1) * self.local]


def probe_positions(n_holdout: int, probe_size: int, source: str, what: str) -> np.ndarray:
    """probe_size evenly spaced ids in [0, n_holdout): no seed, so identical for every run."""
    if n_holdout < probe_size:
        raise DataError(f"{source}: the held-out split holds {n_holdout} {what}, fewer than data.probe_size="
                        f"{probe_size}; lower data.probe_size or raise data.holdout_fraction")
    return (np.arange(probe_size, dtype=np.int64) * n_holdout) // probe_size


class BaseStream:
    """What the loop sees; subclasses set kind, the sampler and `_fetch(ids) -> (x, y)`."""

    kind = ""
    train_size = 0  # data.train_size (restrict): the offline subset's size; 0 = online

    def __init__(self, sampler: Sampler, *, name: str, fingerprint: str, info: dict):
        self.sampler = sampler
        self.name = name
        self.fingerprint = fingerprint
        self.info = info  # JSON-able description (source, split sizes, tokenizer...) for the run log
        self.cursor = 0  # next step the loop will ask for; checkpointed

    @property
    def steps_available(self) -> int:
        return 2**62 if self.train_size else self.sampler.steps_available  # a subset cycles without end

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def batch(self, step: int) -> dict:
        """This rank's share of the global batch of optimizer step `step` (CPU tensors)."""
        x, y = self.subset_rows(self.subset_positions(step)) if self.train_size else self._fetch(self.sampler.indices(step))
        self.cursor = step + 1
        return {"x": x, "y": y}

    # ------------------------------------------------------------------ offline (data.train_size)

    def split_size(self) -> int | None:
        """Training examples in the split (None: unbounded, the synthetic stream)."""
        return self.sampler.n

    def restrict(self, k: int) -> None:
        """data.train_size=k: train on the first k examples of the online order, cycled (module
        docstring); the fingerprint and the "data" row carry k, so runs with another k differ."""
        if not k:
            return
        n = self.split_size()
        if n is not None and k > n:
            raise DataError(f"data.train_size={k} is more than the {n} {getattr(self.sampler, 'what', 'examples')} "
                            f"of {self.name}'s training split; valid: {self.sampler.batch_size}..{n}, or 0 for online")
        self.train_size = int(k)
        self.fingerprint = hash_json([self.fingerprint, {"train_size": self.train_size}])[:16]
        self.info = {**self.info, "train_size": self.train_size}

    def subset_positions(self, step: int) -> np.ndarray:
        """Positions in the subset of this rank's rows of step `step`: (s * B + j) mod K."""
        s = self.sampler
        j = np.arange(s.rank * s.local, (s.rank + 1) * s.local, dtype=np.int64)
        return (int(step) * s.batch_size + j) % self.train_size

    def subset_rows(self, positions: np.ndarray):
        """(x, y) of the subset's examples at `positions` (subset = the epoch-0 order's first K)."""
        return self._fetch(self.sampler.order(0)[:self.train_size][positions])

    def train_subset(self, n: int) -> dict:
        """The subset's first n examples as a probe-like {"x", "y"} (the train_subset_* evaluation)."""
        x, y = self.subset_rows(np.arange(min(n, self.train_size), dtype=np.int64))
        return {"x": x, "y": y}

    def __iter__(self):
        """Batches from the cursor on (resume continues where the checkpoint left off)."""
        while self.cursor < self.steps_available:
            yield self.batch(self.cursor)

    def check_steps(self, steps: int) -> None:
        """Raise the one-line DataError before training when `steps` exceed the split."""
        if steps > self.steps_available and not self.train_size:
            self.sampler.global_indices(steps - 1)

    def state_dict(self) -> dict:
        # the vocabulary and tokenizer too: a resume on re-prepared shards names them (check_resume)
        vocab = {k: self.info[k] for k in ("vocab_size", "tokenizer") if k in self.info}
        return {"fingerprint": self.fingerprint, "seed": self.sampler.seed, "cursor": self.cursor,
                "batch_size": self.sampler.batch_size, "epochs": self.sampler.epochs, **vocab}

    def check_resume(self, d: dict) -> None:
        """DataError (one line) unless checkpointed stream state `d` is this stream's: run at start,
        before any engine, as a vocabulary that changed under a run otherwise surfaced as
        "Error(s) in loading state_dict" from the embedding's shape."""
        if "vocab_size" in d and "vocab_size" in self.info and (d["vocab_size"], d.get("tokenizer")) != (
                self.info["vocab_size"], self.info.get("tokenizer")):
            raise DataError(f"{self.name}: the run was trained on a vocabulary of {d['vocab_size']} (tokenizer "
                            f"{d.get('tokenizer')}), the data now has {self.info['vocab_size']} (tokenizer "
                            f"{self.info.get('tokenizer')}); resume on the data it started with, or start a new run")
        for key in ("fingerprint", "seed", "batch_size"):
            mine = self.fingerprint if key == "fingerprint" else getattr(self.sampler, key)
            if key in d and d[key] != mine:
                raise DataError(f"{self.name}: checkpointed data {key} {d[key]!r} differs from this run's {mine!r}; "
                                f"resume with the same data config")

    def load_state_dict(self, d: dict) -> None:
        self.check_resume(d)
        self.cursor = int(d.get("cursor", 0))

    def save_probe(self, path) -> None:
        """Write the probe split (safetensors, metadata: fingerprint) beside a run, so a reference run
        and a new run can be checked to share it byte for byte."""
        from safetensors.torch import save_file

        p = self.probe()
        save_file({"x": p["x"].contiguous(), "y": p["y"].contiguous()}, str(path),
                  metadata={"fingerprint": self.fingerprint, "source": self.name})

    def describe(self) -> dict:
        return {"source": self.name, "fingerprint": self.fingerprint, "steps_per_epoch": self.steps_per_epoch,
                "steps_available": self.steps_available, **self.info}


class TokenStream(BaseStream):
    """Non-overlapping windows of seq_len + 1 tokens cut from one or more token segments.

    The last `holdout` tokens of the concatenated segments are held out; the probe is
    probe_size evenly spaced windows of that tail. Windows never straddle two segments
    (two shards, two files) so each segment can be a separate memory map.
    """

    kind = "tokens"

    def __init__(self, segments: Sequence[np.ndarray], *, vocab_size: int, seq_len: int, batch_size: int,
                 seed: int, epochs: int, probe_size: int, holdout_fraction: float, rank: int, world_size: int,
                 name: str, content_id: str, info: dict | None = None):
        self.vocab_size, self.seq_len = int(vocab_size), int(seq_len)
        w = self.window = self.seq_len + 1
        total = int(sum(len(s) for s in segments))
        longest = max((len(s) for s in segments), default=0)
        if longest < w:
            raise DataError(f"{name}: data.seq_len={seq_len} needs windows of {w} tokens but the longest token "
                            f"segment holds {longest} (corpus: {total} tokens); lower data.seq_len")
        hold = max(int(np.ceil(holdout_fraction * total)), probe_size * w)
        train, held = _split_tail(segments, hold)
        self._train = [s for s in train if len(s) >= w]
        counts = np.array([len(s) // w for s in self._train], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        held = [s for s in held if len(s) >= w]
        held_starts = np.concatenate([[0], np.cumsum([len(s) // w for s in held])]).astype(np.int64)
        pos = probe_positions(int(held_starts[-1]), probe_size, name, f"windows of {w} tokens")
        self._probe = _gather(held, held_starts, pos, w)  # only the probe windows are read
        if self._probe.size and int(self._probe.max()) >= self.vocab_size:
            raise DataError(f"{name}: token id {int(self._probe.max())} is outside the vocabulary of {vocab_size}")
        n_train = int(self._starts[-1])
        sampler = Sampler(n_train, batch_size, seed=seed, epochs=epochs, rank=rank, world_size=world_size,
                          what=f"windows of {w} tokens", source=name)
        split = {"content": content_id, "seq_len": seq_len, "holdout_tokens": hold, "train_windows": n_train,
                 "probe": hashlib.sha256(self._probe.tobytes()).hexdigest(), "vocab_size": vocab_size}
        info = {**(info or {}), "tokens": total, "train_windows": n_train, "holdout_tokens": hold,
                "vocab_size": vocab_size, "seq_len": seq_len}
        super().__init__(sampler, name=name, fingerprint=hash_json(split)[:16], info=info)

    def windows(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), seq_len + 1) int64 token windows for training window ids."""
        return _gather(self._train, self._starts, ids, self.window)

    def _fetch(self, ids):
        win = torch.from_numpy(self.windows(ids))
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()

    def probe(self) -> dict:
        win = torch.from_numpy(self._probe.copy())
        return {"x": win[:, :-1].contiguous(), "y": win[:, 1:].contiguous()}


def _gather(segments, starts: np.ndarray, ids, w: int) -> np.ndarray:
    """Windows `ids` (numbered across segments, `starts` = cumulative window counts) as int64 rows."""
    ids = np.asarray(ids, dtype=np.int64)
    seg = np.searchsorted(starts, ids, side="right") - 1
    out = np.empty((len(ids), w), dtype=np.int64)
    for row, (g, k) in enumerate(zip(ids.tolist(), seg.tolist())):
        off = (g - int(starts[k])) * w
        out[row] = segments[k][off:off + w]
    return out


def _split_tail(segments: Sequence[np.ndarray], hold: int):
    """Cut the last `hold` tokens off a list of segments: (train segments, held segments)."""
    train, held = list(segments), []
    while hold > 0 and train:
        last = train.pop()
        if len(last) <= hold:
            held.insert(0, last)
            hold -= len(last)
        else:
            cut = len(last) - hold
            train.append(last[:cut])
            held.insert(0, last[cut:])
            hold = 0
    return train, held


class ClassStream(BaseStream):
    """Labelled examples: `fetch(ids) -> (x float32 (n, *in_shape), y int64 (n,))` for training ids.

    The probe split comes ready-made (x, y tensors) from held-out examples.
    """

    kind = "classes"

    def __init__(self, fetch: Callable, probe: tuple, n_train: int, *, in_shape: tuple, num_classes: int,
                 batch_size: int, seed: int, epochs: int, rank: int, world_size: int, name: str,
                 content_id: str, blocks: Sequence[int] | None = None, info: dict | None = None,
                 sampler: Sampler | None = None):
        self.in_shape, self.num_classes = tuple(int(d) for d in in_shape), int(num_classes)
        self._fetch_fn = fetch
        px, py = probe
        self._probe = (px, py)
        sampler = sampler or Sampler(n_train, batch_size, seed=seed, epochs=epochs, rank=rank,
                                     world_size=world_size, blocks=blocks, source=name)
        split = {"content": content_id, "in_shape": self.in_shape, "num_classes": num_classes,
                 "train": n_train, "probe": hashlib.sha256(px.numpy().tobytes() + py.numpy().tobytes()).hexdigest()}
        info = {**(info or {}), "train_examples": n_train, "in_shape": list(self.in_shape),
                "num_classes": num_classes}
        super().__init__(sampler, name=name, fingerprint=hash_json(split)[:16], info=info)

    def _fetch(self, ids):
        return self._fetch_fn(ids)

    def probe(self) -> dict:
        return {"x": self._probe[0].clone(), "y": self._probe[1].clone()}
