"""train.threads: one thread per usable core vs one thread vs auto, alone and beside competitors.

The workload is 10 optimizer steps of a width-512 µP MLP (batch 64). "competing" starts one
busy Python process per usable core for the benchmark's duration, what a shared machine's other
jobs do; auto reads the load average, which takes ~1 minute to show the competitors, so auto is
measured after the load has risen (or reports what it saw). steps/s = 10 / median seconds.
"""
import os
import subprocess
import sys
import time

import pytest
import torch

STEPS = 10


@pytest.fixture(scope="module")
def step():
    from fastwidth.config import load_config, resolve
    from fastwidth.data import build_stream
    from fastwidth.trainer.loop import make_members
    cfg = resolve(load_config(None, ["model.arch=mlp", "model.depth=2", "model.width=512", "data.source=synthetic",
                                     "data.in_dim=128", "data.num_classes=10", "data.batch_size=64",
                                     "train.out_dir=/tmp/fastwidth-bench-unused"]))
    stream = build_stream(cfg.data)
    m = make_members(cfg, stream, torch.device("cpu"))[0]
    b = stream.batch(0)

    def run():
        for _ in range(STEPS):
            m.model.loss(b["x"], b["y"]).backward()
            m.optimizer.step()
            m.optimizer.zero_grad(set_to_none=True)
    return run


@pytest.fixture(params=["quiet", "competing"])
def load(request):
    from fastwidth.trainer.threads import usable_cores
    procs = []
    if request.param == "competing":
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(usable_cores())]
        time.sleep(2.0)
    yield request.param
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize("threads", ["cores", "one", "auto"])
def test_threads(benchmark, step, load, threads):
    from fastwidth.trainer.threads import auto_threads, usable_cores
    n = {"cores": usable_cores(), "one": 1}.get(threads) or auto_threads()[0]
    benchmark.group = f"threads: {load}"
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(before)
    benchmark.extra_info.update(threads=n, load_average=os.getloadavg()[0],
                                steps_per_s=STEPS / benchmark.stats.stats.median)
