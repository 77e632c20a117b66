"""Coordinate checks: the exact own-update / input-change split, every architecture, the command."""
import json

import pytest
import torch

from fastwidth.cli import main
from fastwidth.config import load_config
from fastwidth.stats.coord import CoordTracker, coord_check, spread

GPT = ["model.arch=gpt", "model.depth=1", "model.head_dim=8", "param.base_width=16", "data.source=stdlib",
       "data.seq_len=16", "data.batch_size=4", "data.probe_size=4"]
MLP = ["model.arch=mlp", "model.depth=2", "param.base_width=16", "data.source=synthetic", "data.batch_size=32",
       "data.in_dim=8", "optim.lr=0.01", "optim.grad_clip=0"]
RESNET = ["model.arch=resnet", "model.depth=1", "param.base_width=4", "data.source=fmnist", "data.batch_size=8",
          "data.probe_size=16", "optim.grad_clip=0"]


def test_own_plus_input_change_is_the_whole_change():
    torch.manual_seed(0)
    from fastwidth.nn import MuLinear, MuReadout
    model = torch.nn.Sequential(MuLinear(5, 7), torch.nn.ReLU(), MuReadout(7, 3))
    model[2].mult = 0.25
    with torch.no_grad():
        for p in model.parameters():   # the layers allocate with torch.empty; the µP init is not needed here
            p.normal_(0.0, 0.3)
    x = torch.randn(11, 5)
    tr = CoordTracker(model, x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    from fastwidth.stats.coord import capture
    cap0, cap = tr.cap0, capture(model, x)
    w0 = tr.w0["2"]
    x0, xt = cap0["2"][0], cap["2"][0]
    W, b = model[2].weight, model[2].bias
    own = 0.25 * xt @ (W - w0["weight"]).T + (b - w0["bias"])
    inp = 0.25 * (xt - x0) @ w0["weight"].T
    torch.testing.assert_close(own + inp, cap["2"][1] - cap0["2"][1], rtol=1e-5, atol=1e-6)
    m = tr.measure()
    assert m["2"]["own_rms"] == pytest.approx(float(own.detach().pow(2).mean().sqrt()), rel=1e-5)
    assert m["2"]["input_rms"] == pytest.approx(float(inp.detach().pow(2).mean().sqrt()), rel=1e-5)
    assert m["0"]["input_rms"] == 0.0   # the first layer's input (the data) does not move


def test_a_tied_readout_is_a_coord_layer_with_the_embeddings_matrix():
    """model.tie_embeddings: the readout owns no parameter but moves with embed.weight; its own-update
    part is mult · x (E_t - E_0)ᵀ and the two parts sum to its whole change."""
    from fastwidth.nn import MuEmbedding
    from fastwidth.nn.layers import TiedReadout
    from fastwidth.stats.coord import capture

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = MuEmbedding(9, 6)
            self.readout = TiedReadout(self.embed, 0.5)

        def forward(self, idx):
            return self.readout(torch.tanh(self.embed(idx)))
    torch.manual_seed(0)
    model = Tied()
    with torch.no_grad():
        model.embed.weight.normal_()
    idx = torch.randint(0, 9, (4, 5))
    tr = CoordTracker(model, idx)
    assert set(tr.w0) == {"embed", "readout"}
    with torch.no_grad():
        model.embed.weight.add_(0.1 * torch.randn_like(model.embed.weight))
    cap0, cap = tr.cap0, capture(model, idx)
    (x0, h0), (xt, ht) = cap0["readout"], cap["readout"]
    e0, e = tr.w0["readout"]["weight"], model.embed.weight
    own, inp = 0.5 * xt @ (e - e0).T, 0.5 * (xt - x0) @ e0.T
    torch.testing.assert_close(own + inp, ht - h0, rtol=1e-5, atol=1e-6)
    m = tr.measure()["readout"]
    assert m["own_rms"] == pytest.approx(float(own.pow(2).mean().sqrt()), rel=1e-5) and m["own_rms"] > 0
    assert m["input_rms"] == pytest.approx(float(inp.pow(2).mean().sqrt()), rel=1e-5)


@pytest.mark.parametrize("arch,args,widths", [("gpt", GPT, [16, 32, 64]), ("gpt heads", GPT + ["model.n_heads=2"], [16, 32, 64]),
                                              ("resnet", RESNET, [4, 8]), ("mlp sgd", MLP + ["optim.name=sgd", "optim.lr=0.5"], [16, 32, 64])])
def test_coord_check_covers_every_architecture(arch, args, widths):
    res = coord_check(load_config(None, args), widths, steps=2)
    assert res["layers"] and all(len(layer["by_step"]["own_rms"]) == len(widths) for layer in res["layers"].values())
    for layer in res["layers"].values():
        for q in ("delta_rms", "own_rms", "input_rms"):
            assert all(len(v) == 2 and all(x >= 0 for x in v) for v in layer["by_step"][q])


def test_refined_check_mup_flat_sp_grows_for_the_own_update_part():
    mup = coord_check(load_config(None, MLP), [16, 64, 256], steps=2, seeds=(0, 1))
    sp = coord_check(load_config(None, MLP + ["param.kind=sp"]), [16, 64, 256], steps=2, seeds=(0, 1))
    hidden = "layers.1"
    own_mup = [v[-1] for v in mup["layers"][hidden]["by_step"]["own_rms"]]
    own_sp = [v[-1] for v in sp["layers"][hidden]["by_step"]["own_rms"]]
    assert spread(own_mup) < 1.6, own_mup
    assert own_sp[-1] / own_sp[0] > 2.5, own_sp


@pytest.mark.slow  # trains and draws mup and sp (3 s)
def test_coord_check_command_draws_mup_against_sp(tmp_path, capsys):
    out = tmp_path / "cc"
    assert main(["coord-check", "--set", *MLP, "--widths", "16,32", "--kinds", "mup,sp", "--steps", "2",
                 "--seeds", "1", "-o", str(out)]) == 0
    data = json.loads((out / "coord_check.json").read_text())
    assert [d["kind"] for d in data] == ["mup", "sp"] and data[0]["widths"] == [16, 32]
    assert (out / "coord_check.png").stat().st_size > 20_000


@pytest.mark.parametrize("widths,extra,needle", [("16,3o", [], "'3o' is not a positive integer"),
                                                 ("16,24", ["model.head_dim=16"], "not divisible by model.head_dim=16"),
                                                 ("16,32", ["param.kind=spp"], "param.kind")])
def test_coord_check_bad_input_is_one_line_exit_2(widths, extra, needle, tmp_path, capsys):
    out = tmp_path / "cc"
    assert main(["coord-check", "--set", *GPT, *extra, "--widths", widths, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_stats_does_not_import_the_cli():
    import pathlib
    for f in pathlib.Path("fastwidth/stats").glob("*.py"):
        assert "fastwidth.cli" not in f.read_text(), f


@pytest.mark.slow  # a whole training run (several s): the second tier keeps the fast one under 5 minutes
def test_refined_check_runs_in_the_loop_and_the_report_draws_it(tmp_path):
    from fastwidth.report.cli import make_report
    from fastwidth.trainer.loop import run
    from fastwidth.run.metrics import read_metrics
    from test_train import TINY_MLP, cfg_of
    d = run(cfg_of(tmp_path, TINY_MLP, "train.steps=4", "stats.coord_every=2", "stats.sharpness_iters=0",
                   "stats.ntk_points=0"))
    rows = [r for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "coord"]
    assert sorted({r["step"] for r in rows}) == [2, 4] and {r["width"] for r in rows} == {16, 32}
    assert set(rows[0]["layers"]) == {"layers.0", "layers.1", "readout"}
    assert rows[0]["layers"]["layers.0"]["input_rms"] == 0.0 and rows[0]["layers"]["readout"]["own_rms"] > 0
    make_report([d], tmp_path / "rep")
    assert (tmp_path / "rep" / "coord_in_loop.png").stat().st_size > 10_000
