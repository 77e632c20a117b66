"""µP roles of a user's module family (model.arch python) against microsoft/mup, parameter for parameter.

- inferred roles: ninf and width_mult of each parameter equal mup's set_base_shapes(model, base,
  delta); the lr and weight decay MuAdam and MuSGD give each parameter equal fastwidth's
  optimizer groups' (optim.lr × lr_mult, weight_decay × wd_mult); the readout's forward
  multiplier equals MuReadout's output_mult / width_mult, and one forward pass gives mup's logits.
- fastwidth's own GPT through model=: the inferred table equals model.arch gpt's (its layers'
  mup_roles() unread), its multipliers are applied once, and 20 steps give gpt's losses.
- a model prepared with mup: roles from its infshapes, MuReadout's own multiplier kept, and 20
  steps under fastwidth.train equal plain mup's MuAdam from the same weights.
- fastwidth mup-table's `how` column and .bsh file; the refusals (one line, exit 2).
"""
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fastwidth.cli import main
from fastwidth.config import load_config
from fastwidth.config_args import config_path
from fastwidth.data import build_stream, data_io
from fastwidth.models import build_model
from fastwidth.models.user import register_factory
from fastwidth.param.optim import build_optimizer
from tests.test_mup_oracle import _copy_into, _losses
from tests.usermodels import families

mup = pytest.importorskip("mup")

BASE, WIDTH, LR, WD = 24, 40, 1e-2, 0.1
NINF = {"hidden": 2, "input": 1, "vector": 1, "output": 1, "fixed": 0}
CLASSES_IO = type("IO", (), {"kind": "classes", "in_shape": (families.IN,), "num_classes": families.CLASSES})()
DEMO = str(config_path("demo"))
FAMILIES = {"branchy": (families.branchy, lambda g: torch.randn(6, families.IN, generator=g, dtype=torch.float64)),
            "conv_embed": (families.conv_embed, lambda g: torch.randint(0, families.VOCAB, (3, 7), generator=g)),
            "rounded": (families.rounded, lambda g: torch.randn(6, families.IN, generator=g, dtype=torch.float64))}


def _cfg(make, opt: str, *sets):
    return load_config(None, ["model.arch=python", f"model.factory={register_factory(make)}", f"model.width={WIDTH}",
                              "param.kind=mup", f"param.base_width={BASE}", "param.zero_readout=false",
                              "param.output_mult=2.0", f"optim.name={opt}", f"optim.lr={LR}",
                              f"optim.weight_decay={WD}", *sets])


def _mup_twin(make, output_mult: float, readout: str = "head") -> nn.Module:
    """make(WIDTH) with its readout swapped for mup.MuReadout (same name), base shapes set from
    make(BASE) and make(2 BASE) as mup's README does."""
    model = make(WIDTH)
    old = getattr(model, readout)
    setattr(model, readout, mup.MuReadout(old.in_features, old.out_features, bias=old.bias is not None,
                                          output_mult=output_mult))
    return mup.set_base_shapes(model, make(BASE), delta=make(2 * BASE))


def _group_values(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, tuple[float, float]]:
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


def compare_with_mup(make, opt: str) -> dict:
    """Every difference between fastwidth's table / optimizer and mup's for `make`: the largest
    absolute gap of ninf, width_mult, lr, weight_decay and the readout's forward multiplier."""
    cfg = _cfg(make, opt)
    fw, table = build_model(cfg, CLASSES_IO, seed=0)
    specs = fw.param_roles()
    twin = _mup_twin(make, cfg.param.output_mult)
    names = {id(p): n for n, p in twin.named_parameters()}
    assert set(names.values()) == set(table)
    gaps = {"params": len(table), "ninf": 0, "width_mult": 0.0, "lr": 0.0, "wd": 0.0}
    for name, p in twin.named_parameters():
        gaps["ninf"] = max(gaps["ninf"], abs(NINF[table[name].role] - p.infshape.ninf()))
        gaps["width_mult"] = max(gaps["width_mult"], abs(specs[name].m - p.infshape.width_mult()))
    ours = {n: (g["lr"], g["weight_decay"]) for g in build_optimizer(fw, table, cfg).param_groups for n in g["names"]}
    mu_cls = mup.MuSGD if opt == "sgd" else mup.MuAdam
    theirs = _group_values(mu_cls(twin.parameters(), lr=LR, weight_decay=WD), names)
    for name, (lr, wd) in theirs.items():
        gaps["lr"] = max(gaps["lr"], abs(ours[name][0] - lr))
        gaps["wd"] = max(gaps["wd"], abs(ours[name][1] - wd))
    gaps["forward_mult"] = abs(table["head.weight"].forward_mult - twin.head.output_mult / twin.head.width_mult())
    return gaps


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_inferred_roles_equal_mup(family, opt):
    gaps = compare_with_mup(FAMILIES[family][0], opt)
    assert gaps["ninf"] == 0 and max(gaps["width_mult"], gaps["lr"], gaps["wd"], gaps["forward_mult"]) <= 1e-12, gaps


def test_rounded_family_has_its_own_multipliers():
    """The rounded intermediate (112 at width 40 over 64 at 24: ×1.75, width ×1.67) gives proj and
    fc multipliers of their own, and MuSGD's fc LR (fan_out / fan_in multiplier) is not 1: a
    table with one m = width / base_width, or SGD's hidden LR left at 1, would fail the check above."""
    cfg = _cfg(families.rounded, "sgd")
    fw, table = build_model(cfg, CLASSES_IO, seed=0)
    specs = fw.param_roles()
    assert specs["proj.weight"].m == pytest.approx(112 / 64) and specs["fc.weight"].m == pytest.approx(WIDTH / BASE)
    assert table["fc.weight"].lr_mult == pytest.approx((112 / 64) / (WIDTH / BASE))
    assert table["proj.weight"].lr_mult == pytest.approx((WIDTH / BASE) / (112 / 64))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_user_model_logits_equal_mup_twin(family):
    """The UserModel with fastwidth's hooks (readout × α/m on its input) and the mup twin with the
    same weights give the same logits."""
    make, inputs = FAMILIES[family]
    cfg = _cfg(make, "adam")
    fw, _ = build_model(cfg, CLASSES_IO, seed=1)
    fw.double()
    twin = _copy_into(_mup_twin(make, cfg.param.output_mult), fw)
    x = inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fw(x), twin(x)
    assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()
    assert fw.readout.weight.abs().sum() > 0 and a.abs().max() > 1e-3   # a nonzero readout: the check can fail
    with torch.no_grad():   # and it does without the readout's multiplier
        twin.head.output_mult = 1.0
        assert not torch.allclose(fw(x), twin(x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- fastwidth's GPT through model=

def _demo_io():
    families.gpt_demo(16)
    return families._DEMO_IO["io"]


def _gpt_through_model(width: int = 64):
    cfg = load_config(DEMO, ["model.arch=python", f"model.factory={register_factory(families.gpt_demo)}",
                             f"model.width={width}"])
    return build_model(cfg, _demo_io(), seed=0)


ROW = ("role", "init", "init_std", "lr_mult", "wd_mult", "forward_mult", "eps_mult")


def test_gpt_through_model_has_gpts_table(monkeypatch):
    """Inferred row for row equal to model.arch gpt's, with every fastwidth layer's mup_roles()
    replaced by a wrong answer (so the inference cannot be reading them); the readout multiplier
    sits on MuReadout.mult only (no hook scales it again): the logits are gpt's."""
    from fastwidth.nn import layers
    fw, table = _gpt_through_model()
    gpt, gpt_table = build_model(load_config(DEMO, ["model.width=64"]), _demo_io(), seed=0)
    assert list(table) == list(gpt_table)
    for name, info in gpt_table.items():
        assert [getattr(table[name], k) for k in ROW] == [getattr(info, k) for k in ROW], name
    assert {s.how for s in fw.param_roles().values()} == {"inferred"}
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(fw(x), gpt(x), rtol=0, atol=1e-6)
    assert fw.readout.mult == gpt_table["readout.weight"].forward_mult == 0.5
    assert len(fw.readout._forward_pre_hooks) == 1   # the feature tap; no multiplier hook
    wrong = lambda self: {k: (layers.Role.FIXED, layers.Init.ZEROS) for k in ("weight", "bias")}  # noqa: E731
    for cls in (layers.MuLinear, layers.MuEmbedding, layers.Norm):
        monkeypatch.setattr(cls, "mup_roles", wrong)
    _, table2 = _gpt_through_model()
    assert [[getattr(i, k) for k in ROW] for i in table2.values()] == [[getattr(i, k) for k in ROW] for i in table.values()]


def test_tied_gpt_is_refused():
    cfg = load_config(DEMO, ["model.arch=python", f"model.factory={register_factory(families.gpt_demo_tied)}",
                             "model.width=64"])
    with pytest.raises(Exception, match=r"^readout shares its matrix with another layer \(a tied readout\)"):
        build_model(cfg, _demo_io())


def _train_losses(run_dir: Path) -> dict[tuple[int, int], float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {(r["width"], r["step"]): r["loss"] for r in rows if r.get("kind") == "train"}


FAST_RUN = {"train__steps": 20, "train__log_every": 1, "train__threads": 1, "train__report": False,
            "stats__every": 1000}


def gpt_loss_gap(tmp: Path, twice: bool = False) -> tuple[float, int]:
    """Largest gap between the train losses of the demo GPT through model= and model.arch gpt
    (20 steps, widths 32 and 64, seed 0). twice: the readout's multiplier also hooked on its
    input (applied twice), the mistake the check must catch."""
    import fastwidth
    from fastwidth.models.user import UserModel
    sets = {**FAST_RUN, "sweep__widths": [32, 64], "sweep__seeds": [0]}
    theirs = _train_losses(fastwidth.train("demo", train__out_dir=str(tmp / "gpt"), **sets))
    apply = UserModel.apply_mults

    def hooked_too(self, mults, branch):
        apply(self, mults, branch)
        k = mults[self.readout_name]
        self._mult_hooks.append(self.readout.register_forward_pre_hook(lambda _m, a: (a[0] * k, *a[1:])))
    UserModel.apply_mults = hooked_too if twice else apply
    try:
        ours = _train_losses(fastwidth.train("demo", model=families.gpt_demo, train__out_dir=str(tmp / "model"), **sets))
    finally:
        UserModel.apply_mults = apply
    assert set(ours) == set(theirs) and len(ours) == 40
    return max(abs(ours[k] - theirs[k]) for k in ours), len(ours)


@pytest.mark.slow
def test_gpt_through_model_trains_like_gpt(tmp_path):
    """20 demo steps at widths 32 and 64 (40 losses, 5.545 down to 4.44): the same losses up to
    the readout's cross-entropy op (gpt's fused readout_ce against F.cross_entropy on the logits,
    both fp32: 5e-7 apart at init, an ulp of a loss near 5). 1e-5 allows that rounding to grow
    over 20 Adam steps (measured: 9.5e-7); the readout multiplier applied twice is > 1e-3 off."""
    gap, _ = gpt_loss_gap(tmp_path / "once")
    assert gap <= 1e-5, gap
    gap, _ = gpt_loss_gap(tmp_path / "twice", twice=True)
    assert gap > 1e-3, gap


# ---------------------------------------------------------------- a model prepared with mup

def _mup_cfg(width: int = 64, *sets):
    return load_config(DEMO, ["model.arch=python", f"model.factory={register_factory(families.mup_mlp)}",
                              f"model.width={width}", "data.source=fmnist", "data.batch_size=32",
                              "param.zero_readout=false", "optim.name=adam", "optim.lr=3e-3", "optim.warmup_steps=0",
                              *sets])


def test_mup_prepared_roles_from_infshapes():
    """Built on meta (set_base_shapes inside the factory works there), roles and width
    multipliers come from the infshapes (base 16, not param.base_width 32), MuReadout keeps its
    own α/m (no fastwidth hook on it) and the table reports it."""
    cfg = _mup_cfg()
    fw, table = build_model(cfg, CLASSES_IO, seed=0)
    specs = fw.param_roles()
    assert {s.how for s in specs.values()} == {"mup"}
    assert [table[n].role for n in ("layers.0.weight", "layers.1.weight", "norm.weight", "readout.weight",
                                    "readout.bias")] == ["input", "hidden", "vector", "output", "fixed"]
    assert specs["layers.1.weight"].m == 4.0 and table["layers.1.weight"].lr_mult == 0.25
    assert table["readout.weight"].forward_mult == 2.0 / 4.0
    assert fw.readout.width_mult() == 4.0                       # kept through to_empty (the infshape is gone)
    assert len(fw.readout._forward_pre_hooks) == 1              # the feature tap only
    x = torch.randn(3, 784)
    with torch.no_grad():
        assert torch.allclose(fw(x), nn.functional.linear(fw.norm(torch.relu(fw.layers[1](torch.relu(fw.layers[0](x))))),
                                                           fw.readout.weight, fw.readout.bias) * 0.5, atol=1e-6)


def mup_loss_gap(tmp: Path) -> tuple[float, int]:
    """fastwidth.train(model=mup_mlp) at widths 32 and 64 for 20 steps against plain mup (MuAdam,
    the fastwidth run's initial weights, the same batches)."""
    import fastwidth
    cfg = _mup_cfg()
    sets = {**FAST_RUN, "sweep__widths": [32, 64], "sweep__seeds": [0], "train__out_dir": str(tmp)}
    ours = _train_losses(fastwidth.train(cfg, model=families.mup_mlp, **sets))
    stream = build_stream(cfg.data)
    gap = 0.0
    for width in (32, 64):
        wcfg = _mup_cfg(width)
        fw, _ = build_model(wcfg, data_io(stream, wcfg), seed=0)
        twin = _copy_into(families.mup_mlp(width), fw).float()
        data = [(b["x"], b["y"]) for b in (stream.batch(s) for s in range(20))]
        theirs = _losses(twin, mup.MuAdam(twin.parameters(), lr=3e-3, betas=tuple(wcfg.optim.betas),
                                          eps=wcfg.optim.eps), data)
        mine = [ours[(width, s)] for s in sorted(s for (w, s) in ours if w == width)]
        assert len(mine) == 20 and theirs[-1] < theirs[0] - 0.1
        gap = max(gap, max(abs(a - b) for a, b in zip(mine, theirs)))
    return gap, len(ours)


@pytest.mark.slow
def test_mup_prepared_trains_like_mup(tmp_path):
    gap, _ = mup_loss_gap(tmp_path)
    assert gap <= 1e-5, gap


# ---------------------------------------------------------------- mup-table and refusals

def test_mup_table_how_column_and_bsh(tmp_path, capsys):
    """An override forcing a role and an init shows as `override`, the rest `inferred`; the .bsh
    file mup reads gives the twin the infshapes set_base_shapes(model, base, delta) gives."""
    bsh = tmp_path / "branchy.bsh"
    fac = "model.factory=tests.usermodels.families:branchy"
    assert main(["mup-table", "--format", "jsonl", "--bsh", str(bsh), "--set", "model.arch=python", fac,
                 "model.width=64", "param.base_width=32", 'param.roles={"left.bias": "fixed:ones"}']) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["left.bias"]["how"] == "override" and rows["left.bias"]["role"] == "fixed"
    assert rows["left.bias"]["init"] == "ones" and rows["left.bias"]["lr_mult"] == 1.0
    assert {r["how"] for n, r in rows.items() if n != "left.bias"} == {"inferred"}
    assert rows["head.weight"]["role"] == "output" and rows["head.weight"]["forward_mult"] == 0.5
    from_file = mup.set_base_shapes(families.branchy(64), str(bsh), rescale_params=False, do_assert=False)
    from_models = mup.set_base_shapes(families.branchy(64), families.branchy(32), delta=families.branchy(64 * 2),
                                      rescale_params=False, do_assert=False)
    got = {n: p.infshape for n, p in from_file.named_parameters()}
    assert got == {n: p.infshape for n, p in from_models.named_parameters()}


def test_mup_table_of_a_mup_prepared_model_keeps_its_base(tmp_path, capsys):
    bsh = tmp_path / "m.bsh"
    assert main(["mup-table", "--bsh", str(bsh), "--set", "model.arch=python",
                 "model.factory=tests.usermodels.families:mup_mlp", "model.width=64"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {r["how"] for r in rows.values()} == {"mup"} and rows["readout.weight"]["forward_mult"] == 0.5
    assert "layers.1.weight:\n- 16\n- 16" in bsh.read_text()


REFUSALS = {
    "bad_ratio": r"parameter outer\.weight: dimensions \[0, 1\] grow by different ratios",
    "no_readout": r"no readout found",
    "unknown_vector": r"parameter gate \(_Scaled\.gate, shape \[64\]\): its init cannot be inferred; name it with "
                      r"param\.roles \{\"gate\": \"vector:zeros\|ones\|fan_in\"\}",
    "not_a_module": r"the model factory returned dict at width 64, not an nn\.Module",
    "two_readouts": r"2 matrices read as readouts \(lookup\.table, head\.weight\)",
}


@pytest.mark.parametrize("factory, line", [*REFUSALS.items(),
                                           ("tests.usermodels.absent:make", r"cannot import tests\.usermodels\.absent")])
def test_cli_refuses_in_one_line(factory, line, tmp_path, capsys):
    spec = factory if ":" in factory else f"tests.usermodels.families:{factory}"
    code = main(["train", "--config", "demo", "--set", "model.arch=python", f"model.factory={spec}",
                 "model.width=64", "sweep.widths=[64]", "sweep.seeds=[0]",
                 f"train.out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert __import__("re").search(line, err), err


def test_two_readouts_fixed_by_param_roles():
    """A token table of an unnamed class reads as a second readout; named input:embed it is one."""
    cfg = load_config(None, ["model.arch=python", "model.factory=tests.usermodels.families:two_readouts",
                             "model.width=64", 'param.roles={"lookup.*": "input:embed"}'])
    fw, table = build_model(cfg, CLASSES_IO, seed=0)
    assert (table["lookup.table"].role, table["lookup.table"].init) == ("input", "normal")
    assert fw.readout_name == "head" and table["head.weight"].role == "output"


def test_unknown_vector_fixed_by_param_roles():
    """The fix the refusal shows works: the gate named vector:ones trains as a vector."""
    cfg = load_config(None, ["model.arch=python", "model.factory=tests.usermodels.families:unknown_vector",
                             "model.width=64", 'param.roles={"gate": "vector:ones"}'])
    fw, table = build_model(cfg, CLASSES_IO, seed=0)
    assert table["gate"].role == "vector" and table["gate"].init == "ones" and fw.param_roles()["gate"].how == "override"
    assert math.isclose(float(fw.gate.detach().sum()), 64.0)
