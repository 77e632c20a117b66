"""What fastwidth's statistics cost inside someone else's trainer: the same training with the
consistency callback on and off (CPU).

    python bench/callback_overhead.py [--loop auto|hf|lightning] [--steps 60] [--every 20] [--repeats 3]
                                      [--preact-every 1] [--widths 64 128] [--threads 1]

Two members (tiny Llamas from transformers, widths --widths, 2 layers, vocabulary 64) each train
--steps optimizer steps in their own trainer, one after the other, on one dataset: a
transformers.Trainer (loop hf; it needs accelerate) or a lightning.Trainer around the same model
(loop lightning; auto takes hf where accelerate imports). `off`: the trainers alone; `on`: each
with the consistency callback sharing one fastwidth.Consistency (the probe evaluation at step 0
and every --every steps, the preactivation hooks on every training forward). The modes alternate
--repeats times in one process, so drift on a shared machine hits both; each time is the wall
clock of the two trainers' fit, models rebuilt from the same seeds each time. The report written
at the end (figures) is timed apart, once: a one-off cost, not per step.
Prints off and on (median seconds, each repeat's too) and the ratio on/off, in wall seconds and in
this process's CPU seconds (time.process_time; with --threads 1 the work itself, which other
processes on a shared machine do not inflate as they do the wall clock).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch

VOCAB, SEQ = 64, 32


def llama(width: int, seed: int):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width,
                                   num_hidden_layers=2, num_attention_heads=width // 16,
                                   num_key_value_heads=width // 16, max_position_embeddings=SEQ,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def data(n: int):
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    return seqs


def fit_hf(model, seqs, steps, batch, callbacks, out):
    import transformers
    ds = [{"input_ids": s[:SEQ], "labels": s[:SEQ].clone()} for s in seqs]
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
                                          learning_rate=3e-3, seed=0, logging_steps=10, save_strategy="no",
                                          report_to=[], use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks).train()


def fit_lightning(model, seqs, steps, batch, callbacks, out):
    import lightning.pytorch as pl

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, b, _):
            x, = b
            return self.net(input_ids=x[:, :SEQ], labels=x[:, :SEQ]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), 3e-3)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(seqs), batch_size=batch, shuffle=False)
    pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=callbacks, default_root_dir=str(out)).fit(LM(), loader)


def once(loop: str, on: bool, a, seqs, probe, tmp: Path, report: bool = False) -> tuple[float, float, float]:
    """(wall seconds of the trainers' fits, this process's CPU seconds of them, seconds of the
    report (report=True; else 0)) for one mode."""
    import fastwidth
    from fastwidth.interop.callbacks import hf_callback, lightning_callback
    models = {f"w{w}": (llama(w, 0), w, 0) for w in a.widths}
    fit = fit_hf if loop == "hf" else fit_lightning
    make = hf_callback if loop == "hf" else lightning_callback
    c = None
    if on:
        c = fastwidth.Consistency(models, probe, tmp / f"run{time.time_ns()}", steps=a.steps, every=a.every,
                                  stats={"bootstrap": 100, "preact_every": a.preact_every}, report=False)  # the report is timed apart, below
    t0, c0 = time.perf_counter(), time.process_time()
    for name, (model, _, _) in models.items():
        fit(model, seqs, a.steps, a.batch, [make(c, name)] if on else [], tmp / "out")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rep = 0.0
    if on and report:
        t1 = time.perf_counter()
        c.report()
        rep = time.perf_counter() - t1
    return wall, cpu, rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loop", default="auto", choices=["auto", "hf", "lightning"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--probe", type=int, default=32, help="probe sequences")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--preact-every", type=int, default=1, help="stats.preact_every: observe every k-th training forward")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    loop = a.loop
    if loop == "auto":
        loop = "hf" if importlib.util.find_spec("accelerate") else "lightning"
    seqs = data(a.steps * a.batch + a.probe)
    train, held = seqs[:a.steps * a.batch], seqs[a.steps * a.batch:]
    probe = (held[:, :SEQ], held[:, 1:])
    walls = {"off": [], "on": []}
    cpus = {"off": [], "on": []}
    reports = []
    with tempfile.TemporaryDirectory() as d:
        once(loop, False, a, train, probe, Path(d))  # warm-up: imports, first-call costs
        for _ in range(a.repeats):
            for mode in ("off", "on"):
                wall, cpu, rep = once(loop, mode == "on", a, train, probe, Path(d), report=not reports)
                walls[mode].append(wall)
                cpus[mode].append(cpu)
                if rep:
                    reports.append(rep)
    off, on = statistics.median(walls["off"]), statistics.median(walls["on"])
    coff, con = statistics.median(cpus["off"]), statistics.median(cpus["on"])
    paired = statistics.median(b / o for o, b in zip(cpus["off"], cpus["on"]))
    print(f"loop {loop}: {len(a.widths)} members (widths {a.widths}) x {a.steps} steps, batch {a.batch} x {SEQ} tokens, "
          f"evaluations every {a.every} steps on {a.probe} probe sequences, preactivations every "
          f"{a.preact_every} step(s), {a.threads} thread(s)")
    print(f"off: median {off:.2f} s  ({', '.join(f'{w:.2f}' for w in walls['off'])})")
    print(f"on:  median {on:.2f} s  ({', '.join(f'{w:.2f}' for w in walls['on'])})")
    print(f"ratio on/off (wall): {on / off:.3f}")
    print(f"CPU s of this process (threads={a.threads}; what a loaded machine's wall time hides):")
    print(f"off: median {coff:.2f} s  ({', '.join(f'{w:.2f}' for w in cpus['off'])})")
    print(f"on:  median {con:.2f} s  ({', '.join(f'{w:.2f}' for w in cpus['on'])})")
    print(f"ratio on/off (CPU): {con / coff:.3f}; median of the paired repeats' ratios {paired:.3f}")
    print(f"report at the end, once: {statistics.median(reports):.1f} s wall")


if __name__ == "__main__":
    main()
