"""A random teacher MLP labelling fresh Gaussian inputs: the fast, exact online stream.

Teacher (seeded by data.seed): x ~ N(0, I_d), h = relu(W1 x / sqrt(d) + b1),
logits = W2 (h - E h) / sqrt(k), label = argmax(logits); centering h (E h estimated once on a
fixed seeded sample) keeps the classes roughly balanced instead of one class dominating.
Computed in float64 numpy so labels are identical on every machine. Every step draws new
inputs from SeedSequence(seed, tag, step): no input is served twice, and the probe uses its
own SeedSequence (a different tag), disjoint from every training step's stream.
Label noise (data.label_noise = q): each training label is replaced, with probability q, by a
class drawn uniformly (its own SeedSequence per step, so every rank agrees); the probe keeps the
teacher's labels, so the statistics compare models on the clean task they learn noisily.
"""
from __future__ import annotations

import numpy as np
import torch

from fastwidth.data.stream import BaseStream, check_ranks, hash_json, seed_sequence

_TEACHER, _INPUTS, _PROBE, _NOISE = 0x7EAC, 0x1A9, 0x9B0BE, 0x4015E


class Teacher:
    def __init__(self, seed: int, in_dim: int, width: int, num_classes: int):
        rng = np.random.Generator(np.random.PCG64(seed_sequence(seed, _TEACHER)))
        self.w1 = rng.standard_normal((width, in_dim)) / np.sqrt(in_dim)
        self.b1 = 0.5 * rng.standard_normal(width)
        self.w2 = rng.standard_normal((num_classes, width)) / np.sqrt(width)
        self.h_mean = np.zeros(width)
        self.h_mean = self._hidden(rng.standard_normal((4096, in_dim))).mean(axis=0)

    def _hidden(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.w1.T + self.b1, 0.0)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return (self._hidden(x) - self.h_mean) @ self.w2.T

    def labels(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x).argmax(axis=1)


class _Unbounded:
    """Sampler stand-in: the synthetic stream never runs out."""

    def __init__(self, batch_size, seed, epochs, rank, world_size):
        self.batch_size, self.seed, self.epochs = batch_size, seed, epochs
        self.rank, self.world_size = rank, world_size
        self.local = check_ranks(batch_size, rank, world_size)
        self.steps_per_epoch = self.steps_available = 2**62


class SyntheticStream(BaseStream):
    kind = "classes"

    def __init__(self, *, seed: int, in_dim: int, teacher_width: int, num_classes: int, batch_size: int,
                 probe_size: int, epochs: int = 1, rank: int = 0, world_size: int = 1, label_noise: float = 0.0):
        self.in_shape, self.num_classes, self.label_noise = (in_dim,), num_classes, float(label_noise)
        self.teacher = Teacher(seed, in_dim, teacher_width, num_classes)
        sampler = _Unbounded(batch_size, seed, epochs, rank, world_size)
        px, py = self._draw(seed_sequence(seed, _PROBE), probe_size)
        self._probe = (px, py)
        ident = {"source": "synthetic", "seed": seed, "in_dim": in_dim, "teacher_width": teacher_width,
                 "num_classes": num_classes, "probe_size": probe_size}
        if self.label_noise:                                          # absent at 0: earlier runs keep their fingerprint
            ident["label_noise"] = self.label_noise
        super().__init__(sampler, name="synthetic", fingerprint=hash_json(ident)[:16], info=dict(ident))

    def _draw(self, ss, n: int):
        x = np.random.Generator(np.random.PCG64(ss)).standard_normal((n, self.in_shape[0]))
        y = self.teacher.labels(x)
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))

    def _global(self, step: int):
        """The whole global batch of `step` (x, y), label noise applied."""
        s = self.sampler
        x, y = self._draw(seed_sequence(s.seed, _INPUTS, step), s.batch_size)
        if self.label_noise:
            rng = np.random.Generator(np.random.PCG64(seed_sequence(s.seed, _NOISE, step)))
            flip = rng.random(s.batch_size) < self.label_noise
            y = torch.where(torch.from_numpy(flip), torch.from_numpy(rng.integers(0, self.num_classes, s.batch_size)), y)
        return x, y

    def batch(self, step: int) -> dict:
        if self.train_size:
            return super().batch(step)
        s = self.sampler
        # The whole global batch is drawn and sliced, so the union over ranks is the 1-rank batch.
        x, y = self._global(step)
        lo = s.rank * s.local
        self.cursor = step + 1
        return {"x": x[lo:lo + s.local].contiguous(), "y": y[lo:lo + s.local].contiguous()}

    def split_size(self) -> None:
        return None  # every step draws new inputs: any data.train_size fits

    def subset_rows(self, positions: np.ndarray):
        """The subset is the first K examples the online steps draw (steps 0.. ceil(K/B)-1)."""
        if getattr(self, "_subset", None) is None:
            steps = -(-self.train_size // self.sampler.batch_size)
            xs, ys = zip(*(self._global(t) for t in range(steps)))
            self._subset = torch.cat(xs)[:self.train_size], torch.cat(ys)[:self.train_size]
        idx = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        return self._subset[0][idx].contiguous(), self._subset[1][idx].contiguous()

    def check_steps(self, steps: int) -> None:
        pass

    def probe(self) -> dict:
        return {"x": self._probe[0].clone(), "y": self._probe[1].clone()}
