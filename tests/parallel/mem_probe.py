"""Launched like launch/train.py: prints this rank's measured peak memory of training as JSON
(VmHWM after the run minus VmRSS before the Trainer is built: states, activations, buffers)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fastwidth.cli import build_parser, overrides_of  # noqa: E402
from fastwidth.config import load_config  # noqa: E402
from fastwidth.train.loop import Trainer  # noqa: E402


def status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main():
    args = build_parser().parse_args(["train", *sys.argv[1:]])
    cfg = load_config(args.config, overrides_of(args))
    import torch  # noqa: F401  (everything imported before the baseline)
    before = status("VmRSS")
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.dist.close()
    print("MEM " + json.dumps({"rank": trainer.dist.rank, "peak": status("VmHWM") - before}), flush=True)


if __name__ == "__main__":
    main()
