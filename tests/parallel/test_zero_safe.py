"""DeepSpeed checkpoints that load without unpickling (parallel/zero_files.py), on 2 CPU ranks.

A ZeRO-1/2/3 member (and a bf16 ZeRO-2 one) is saved as safetensors + JSON only (no .pt, no
copied recovery script) and a resume from it is bit-equal to a run never stopped; ZeRO-3 still
reshards onto another rank count (load_universal); export and load_model give the weights
DeepSpeed's own reader gives from the pickles this version no longer keeps; a pickle payload
planted in a member directory (beside the converted files, or in place of one) is refused by
export, load_model and resume with one line, and its code never runs.
"""
import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fastwidth.api import load_model
from fastwidth.errors import CheckpointError
from fastwidth.parallel import zero_files
from fastwidth.parallel.checkpoints import member_dir
from fastwidth.run import checkpoint as ckpt
from fastwidth.trainer.engine_checkpoint import export_checkpoint, member_tensors

from test_dist import ROOT, launch, losses, rewind  # tests/parallel is on sys.path (rootdir import mode)

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# a µP MLP on the synthetic teacher: no data preparation, ~15 s a launch on 2 busy cores
CONFIG = {"model": {"arch": "mlp", "depth": 2}, "param": {"base_width": 16},
          "data": {"source": "synthetic", "in_dim": 8, "num_classes": 4, "batch_size": 8, "probe_size": 8},
          "sweep": {"widths": [32], "seeds": [0]},
          "train": {"steps": 4, "progress": False, "log_every": 1, "ckpt_every": 2, "report": False, "threads": 1},
          "stats": {"enabled": False}}
MEMBER = "w32_s0"


def zero(stage: int) -> list[str]:
    return ["dist.backend=deepspeed", f"dist.zero_stage={stage}"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero_safe")
    cfg_file = tmp / "mlp.yaml"
    cfg_file.write_text(yaml.safe_dump(CONFIG))
    return tmp, cfg_file


@pytest.fixture(scope="module")
def trained(work):
    """stage -> a 2-rank run directory (4 steps, checkpoints at 2 and 4), trained once."""
    tmp, cfg_file = work
    done = {}

    def get(stage):
        if stage not in done:
            done[stage] = tmp / f"zero{stage}"
            launch("deepspeed", ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={done[stage]}", *zero(stage)])
        return done[stage]
    return get


def engine_files(run):
    return sorted(p for c in (run / "checkpoints").glob("step_*") for p in (c / "engine").rglob("*") if p.is_file())


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_member_is_safetensors_and_json_and_resumes_bit_equal(work, trained, stage):
    tmp, cfg_file = work
    safe_and_resumes_bit_equal(cfg_file, trained(stage), tmp / f"zero{stage}-resumed", zero(stage))


def test_a_bf16_member_is_safetensors_and_json_and_resumes_bit_equal(work):
    """A bf16 engine (dist.mixed_precision=bf16: DeepSpeed's bf16 optimizer, fp32 master weights
    and its own loss scaler state) holds only classes zero_files.ALLOWED keeps."""
    tmp, cfg_file = work
    sets = [*zero(2), "dist.mixed_precision=bf16"]
    straight = tmp / "zero2-bf16"
    launch("deepspeed", ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={straight}", *sets])
    files = engine_files(straight)
    assert any(p.name.startswith("bf16_zero_pp_rank_") for p in files)  # DeepSpeed's bf16 optimizer ran
    model = next(p for p in files if p.name == "mp_rank_00_model_states.safetensors")
    assert {t.dtype for t in load_file(str(model)).values()} == {torch.bfloat16}
    safe_and_resumes_bit_equal(cfg_file, straight, tmp / "zero2-bf16-resumed", sets)


def safe_and_resumes_bit_equal(cfg_file, straight, resumed, sets):
    """Every engine file of run `straight` is safetensors or JSON under a sha256, every tree
    decodes, and a resume from step 2 (a copy at `resumed`) gives the very floats it gave."""
    files = engine_files(straight)
    assert files and {p.suffix for p in files} == {".safetensors", ".json"}, [p.name for p in files]
    listed = {c / f for c in (straight / "checkpoints").glob("step_*") for f in ckpt.read_checkpoint(c)["files"]}
    assert set(files) <= listed                           # every file under a sha256 read_checkpoint verified
    for f in files:
        if f.suffix == ".json":
            zero_files.read_file(f)  # every tree decodes with its tensors
    again = rewind(straight, resumed, 2)
    launch("deepspeed", ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={again}", "train.resume=true", *sets])
    a, b = losses(straight), losses(again)
    assert set(a) == set(b) and any(step > 2 for _, step in a)
    assert a == b                                        # bit-equal: the same float in every row


def test_zero3_reshards_onto_one_rank(work, trained):
    """ZeRO-3 saved on 2 ranks resumes on 1 through the universal conversion, which now reads the
    rebuilt files: the losses after the resume equal a 1-rank run never stopped."""
    tmp, cfg_file = work
    one = tmp / "zero3-one-rank"
    launch("python", ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={one}", *zero(3)])
    again = rewind(trained(3), tmp / "zero3-2to1", 2)
    launch("python", ROOT / "launch" / "train.py", cfg_file, [f"train.out_dir={again}", "train.resume=true", *zero(3)])
    a, b = losses(one), losses(again)
    after = [k for k in a if k[1] > 2]
    assert after and set(a) == set(b)
    assert max(abs(a[k] - b[k]) / abs(a[k]) for k in after) <= 1e-6
    assert not list((again / "checkpoints").glob(".universal-*"))
    assert {p.suffix for p in engine_files(again)} == {".safetensors", ".json"}


def as_pickles(run, to):
    """A copy of `run` whose members are DeepSpeed's pickles, as this version no longer keeps them
    (rebuilt from the safetensors + JSON, which test_zero_files shows exact)."""
    shutil.copytree(run, to)
    for checkpoint in (to / "checkpoints").glob("step_*"):
        for where in (checkpoint / "engine").iterdir():
            with zero_files.readable(where, trust=False) as src:
                for f in where.iterdir():
                    f.unlink()
                for pt in src.iterdir():
                    shutil.copy(pt, where / pt.name)
        meta = json.loads((checkpoint / ckpt.META).read_text())  # as that version listed them: none
        meta["files"] = {f: digest for f, digest in meta["files"].items() if not f.startswith("engine/")}
        (checkpoint / ckpt.META).write_text(json.dumps(meta))
    return to


@pytest.mark.parametrize("stage", [2, 3])
def test_export_and_load_model_give_deepspeeds_own_weights(work, trained, stage):
    tmp, _ = work
    run = trained(stage)
    out = tmp / f"zero{stage}.safetensors"
    assert export_checkpoint(run, out) == [MEMBER]
    got = load_file(str(out))
    legacy = as_pickles(run, tmp / f"zero{stage}-pickles")
    path = ckpt.latest_checkpoint(legacy / "checkpoints")
    before = member_tensors(path, ckpt.read_checkpoint(path, trust=True), MEMBER)  # DeepSpeed reads the .pt
    assert set(got) == set(before) and len(got) == 6
    for k in got:
        assert torch.equal(got[k], before[k].float()), k
    model = load_model(run, MEMBER)
    for k, v in model.state_dict().items():
        assert torch.equal(v, got[k]), k


class Payload:
    """Unpickling it creates `marker`: code run from a checkpoint file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(run, to, how: str, marker):
    """A copy of `run` with a pickle payload in its latest member directory: `beside` the
    converted files (named as DeepSpeed's model states, which it would read), or `instead` of
    rank 0's optimizer state."""
    shutil.copytree(run, to)
    where = member_dir(ckpt.latest_checkpoint(to / "checkpoints"), MEMBER)
    if how == "beside":
        name = next(p.stem for p in sorted(where.glob("*model_states.json")))
    else:
        name = "zero_pp_rank_0_mp_rank_00_optim_states"
        for suffix in (".json", ".safetensors"):
            (where / f"{name}{suffix}").unlink()
    torch.save(Payload(marker), where / f"{name}.pt")    # what torch.load(weights_only=False) runs
    return to


@pytest.mark.parametrize("how", ["beside", "instead"])
@pytest.mark.parametrize("stage", [2, 3])
def test_a_planted_pickle_is_refused_by_export_and_load_model(work, trained, stage, how):
    tmp, _ = work
    marker = tmp / f"ran-{stage}-{how}"
    run = plant(trained(stage), tmp / f"planted-{stage}-{how}", how, marker)
    res = subprocess.run([sys.executable, "-m", "fastwidth.cli", "export", str(run), "-o", str(tmp / "x.safetensors")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "trust-checkpoint" in lines[0], res.stderr[-3000:]
    with pytest.raises(CheckpointError, match="trust-checkpoint"):
        load_model(run, MEMBER)
    assert not marker.exists() and not (tmp / "x.safetensors").exists()


@pytest.mark.parametrize("how", ["beside", "instead"])
def test_a_planted_pickle_is_refused_by_resume(work, trained, how):
    tmp, cfg_file = work
    marker = tmp / f"ran-resume-{how}"
    run = plant(trained(2), tmp / f"planted-resume-{how}", how, marker)
    res = launch("deepspeed", ROOT / "launch" / "train.py", cfg_file,
                 [f"train.out_dir={run}", "train.resume=true", "train.steps=6", *zero(2)], check=False)
    assert res.returncode != 0
    errors = {l for l in res.stderr.splitlines() if "fastwidth: error:" in l}
    assert errors and all("trust-checkpoint" in l for l in errors), res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert not marker.exists()
