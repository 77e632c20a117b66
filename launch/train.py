"""Entry for `python launch/train.py --config FILE [--set a.b=v ...]`.

The same file runs under `deepspeed [--num_gpus N] launch/train.py --config FILE` (which passes
--local_rank) and `torchrun --nproc_per_node N launch/train.py --config FILE`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fastwidth.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
