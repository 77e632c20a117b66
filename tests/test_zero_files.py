"""DeepSpeed's checkpoint states as safetensors + JSON (parallel/zero_files.py), in one process and
without DeepSpeed: a state with every container and scalar kind DeepSpeed's files hold survives
encode -> files -> decode exactly (every tensor bit for bit, every value and type), and decoding
refuses what it does not know, naming the file."""
import collections
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from fastwidth.errors import CheckpointError
from fastwidth.parallel import zero_files


def same(a, b, where="state"):
    """Equal in type and value at every node; tensors equal bit for bit (dtype, shape, bytes)."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        as_bytes = [t.contiguous().view(-1).view(torch.uint8).tolist() for t in (a, b)]
        assert as_bytes[0] == as_bytes[1], where
    elif isinstance(a, dict):
        assert list(a) == list(b), where                   # same keys in the same order
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, (where, a, b)


def a_deepspeed_like_state() -> dict:
    flat = torch.randn(40, generator=torch.Generator().manual_seed(0))
    return {"module": collections.OrderedDict([("layers.0.weight", flat[:12].view(3, 4)),   # a view of a shared buffer
                                               ("layers.0.bias", torch.tensor([1, 2, 3], dtype=torch.int64)),
                                               ("scale", torch.tensor(0.5, dtype=torch.bfloat16)),  # 0-dim
                                               ("empty", torch.zeros(0)),                           # ZeRO-3's stubs
                                               ("t", flat[::2][:5])]),                              # strided
            "param_shapes": [collections.OrderedDict([("layers.0.weight", torch.Size([3, 4]))])],
            "base_optimizer_state": {"state": {0: {"step": torch.tensor(4.0), "exp_avg": flat[12:]}},
                                     "param_groups": [{"betas": (0.9, 0.999), "params": [0], "lr": 1e-3,
                                                       "foreach": None, "fused": True, "names": ["a", "b"]}]},
            "dtype": torch.bfloat16, "steps_per_print": 1 << 62, "cur_scale": float("inf"),
            "overflow": float("nan"), "neg": float("-inf"), "@": "a key that looks like a tag",
            "nested": ((1, "x"), [])}


def write(tmp_path, state, stem="zero_pp_rank_0_mp_rank_00_optim_states"):
    tensors = {}
    tree = zero_files.encode(state, tensors)
    save_file(tensors, str(tmp_path / f"{stem}.safetensors"))
    (tmp_path / f"{stem}.json").write_text(json.dumps({"format": zero_files.FORMAT, "tree": tree}))
    return tmp_path / f"{stem}.json"


def test_a_state_round_trips_exactly(tmp_path):
    state = a_deepspeed_like_state()
    tree_file = write(tmp_path, state)
    json.loads(tree_file.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    same(state, zero_files.read_file(tree_file))


def test_a_member_directory_is_rebuilt_in_scratch_and_removed(tmp_path):
    member = tmp_path / "w32_s0"
    member.mkdir()
    state = a_deepspeed_like_state()
    write(member, state)
    with zero_files.readable(member, trust=False) as src:
        assert src.name == member.name and not src.is_relative_to(tmp_path)
        same(state, torch.load(src / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=True))
    assert not src.exists()
    assert sorted(p.suffix for p in member.iterdir()) == [".json", ".safetensors"]


@pytest.mark.parametrize("tree", [{"@": "os.system", "v": ["touch x"]},
                                  {"a": [1, {"@": "builtins.eval", "v": "1"}]},
                                  {"@": "torch.Size", "v": "not a list of ints"}])
def test_an_unknown_or_malformed_tag_is_refused_naming_the_file(tmp_path, tree):
    tree_file = tmp_path / "mp_rank_00_model_states.json"
    save_file({}, str(tmp_path / "mp_rank_00_model_states.safetensors"))
    tree_file.write_text(json.dumps({"format": zero_files.FORMAT, "tree": tree}))
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.json") as e:
        zero_files.read_file(tree_file)
    assert "\n" not in str(e.value)


def test_a_tensor_missing_from_the_safetensors_is_refused(tmp_path):
    tree_file = write(tmp_path, {"w": torch.ones(2)})
    save_file({}, str(tmp_path / f"{tree_file.stem}.safetensors"))
    with pytest.raises(CheckpointError, match="lacks"):
        zero_files.read_file(tree_file)


def test_an_earlier_versions_pickles_need_trust(tmp_path):
    member = tmp_path / "w32_s0"
    member.mkdir()
    torch.save({"module": {}}, member / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="trust-checkpoint"):
        with zero_files.readable(member, trust=False):
            pass
    with zero_files.readable(member, trust=True) as src:
        assert src == member                               # DeepSpeed reads them as before
