import pytest

from fastwidth.config import (Config, apply_overrides, dump_yaml, from_dict, load_config, reference_rows,
                              resolve)
from fastwidth.errors import ConfigError


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_and_overrides_are_typed(tmp_path):
    p = write(tmp_path, "model: {arch: gpt, width: 64}\noptim: {lr: 3e-3}\nsweep: {widths: [64, 32]}\n")
    cfg = load_config(p, ["optim.lr=1e-2", "param.kind=sp", "train.steps=7", "param.attn_mult=null"])
    assert cfg.optim.lr == pytest.approx(1e-2) and isinstance(cfg.optim.lr, float)
    assert cfg.param.kind == "sp" and cfg.train.steps == 7 and cfg.param.attn_mult is None
    assert cfg.name == "c"
    r = resolve(cfg)
    assert r.sweep.widths == [32, 64] and r.sweep.reference_width == 64 and r.sweep.seeds == [0]
    assert r.train.out_dir.startswith("runs/c-")


@pytest.mark.parametrize("override,needle", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    (["modle.width=3"], "unknown config key 'modle' (did you mean 'model'?)"),
    (["train.steps=1.5"], "train.steps: expected int, got 1.5"),
    (["train.steps=true"], "train.steps: expected int"),
    (["model.arch=gpx"], "model.arch: 'gpx' is not one of gpt, mlp, resnet"),
    (["data.batch_size=0"], "data.batch_size: 0 is below the minimum 1"),
    (["model.width=100", "model.head_dim=32"], "model.width 100 is not divisible by model.head_dim=32"),
    (["sweep.widths=[32,48]", "model.head_dim=32"], "model.width 48 is not divisible"),
    (["sweep.widths=[64]", "sweep.reference_width=128"], "sweep.reference_width 128 is not in the widths"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["sweep.widths=3"], "sweep.widths: expected a list"),
    (["optim"], "must look like section.key=value"),
    (["model.arch=gpt", "stats.ntk_output=trace"], "stats.ntk_output=trace is for classifiers"),
])
def test_bad_values_are_one_clear_line(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = write(tmp_path, "model:\n  width: [64\n")
    with pytest.raises(ConfigError, match=r"c.yaml is not valid YAML at line \d+"):
        load_config(p)
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n", "l.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = resolve(load_config(None, ["sweep.widths=[32,64]", "optim.lr=2e-3", "dist.deepspeed={a: 1}"]))
    import yaml
    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_override_creates_nested_and_rejects_non_sections():
    d = apply_overrides({}, ["model.width=64", "sweep.seeds=[0,1]"])
    assert d == {"model": {"width": 64}, "sweep": {"seeds": [0, 1]}}
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"model": 3}, ["model.width=64"])


def test_reference_covers_every_key():
    keys = {r[0] for r in reference_rows()}
    for section in ("model", "param", "optim", "data", "train", "sweep", "stats", "dist"):
        sec = getattr(Config(), section)
        for f in sec.__dataclass_fields__:
            assert f"{section}.{f}" in keys
    for k in ("model.arch", "model.width", "model.depth", "model.head_dim", "param.kind", "param.base_width",
              "optim.name", "optim.lr", "optim.weight_decay", "data.source", "data.path", "data.batch_size",
              "train.steps", "train.out_dir", "train.seed", "sweep.widths", "sweep.seeds",
              "sweep.reference_width", "stats.every", "dist.backend", "dist.zero_stage"):
        assert k in keys, k
