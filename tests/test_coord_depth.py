"""The coordinate check across depth (DESIGN §5): what it measures, the rules it shows, the command."""
import json

import pytest
import torch

from fastwidth.cli import main
from fastwidth.config import load_config
from fastwidth.stats.coord import LAST_BLOCK, OutputTracker, coord_check_depth, depth_layers, spread

TINY = ["model.arch=gpt", "model.width=32", "model.head_dim=8", "param.base_width=16", "param.base_depth=2",
        "data.source=stdlib", "data.seq_len=16", "data.batch_size=4", "data.probe_size=4"]
LAYERS = ["embed", LAST_BLOCK, "norm_f", "readout"]


@pytest.fixture(scope="module")
def checks():
    """mup and completep at depths 2 and 4, 2 steps; both with ε × 1/m_N so that at base depth the
    two are the same parameterization (the depth kinds equal mup there, DESIGN §3)."""
    return {k: coord_check_depth(load_config(None, [*TINY, f"param.kind={k}", "optim.eps_scaling=width"]), [2, 4],
                                 steps=2) for k in ("mup", "completep")}


def test_blocks_last_is_the_residual_stream_and_the_others_their_outputs():
    from fastwidth.data import build_stream, data_io
    from fastwidth.models import build_model
    cfg = load_config(None, [*TINY, "model.depth=3", "param.kind=completep"])
    stream = build_stream(cfg.data)
    model, _ = build_model(cfg, data_io(stream, cfg), seed=0)
    layers = depth_layers(model)
    assert list(layers) == LAYERS
    x = stream.batch(0)["x"]
    tr = OutputTracker(model, x, layers)
    with torch.no_grad():
        h = model.embed(x)
        for block in model.blocks:          # the residual stream by hand, block after block
            h = block(h, model.rope_cos, model.rope_sin)
        logits = model(x)
    cap = tr.cap0
    torch.testing.assert_close(cap[LAST_BLOCK][1], h)
    torch.testing.assert_close(cap["norm_f"][1], model.norm_f(h))
    torch.testing.assert_close(cap["readout"][1], logits.float())
    with torch.no_grad():
        model.blocks[-1].mlp.proj.weight.add_(0.1)
    m = tr.measure()
    assert m["embed"]["delta_rms"] == 0.0 and m[LAST_BLOCK]["delta_rms"] > 0


def test_result_lists_every_layer_per_depth(checks):
    for kind, res in checks.items():
        assert res["kind"] == kind and res["depths"] == [2, 4] and res["width"] == 32 and res["base_depth"] == 2
        assert list(res["layers"]) == LAYERS
        for layer in res["layers"].values():
            assert len(layer["act_rms"]) == 2 and len(layer["update_rms"]) == 2
            assert layer["update_rms"] == [v[-1] for v in layer["by_step"]["delta_rms"]]


def test_at_base_depth_completep_is_mup_and_deeper_it_keeps_the_stream_update_flat(checks):
    mup, cp = checks["mup"]["layers"], checks["completep"]["layers"]
    for name in LAYERS:  # depth 2 = base depth: the same model, the same numbers
        assert mup[name]["update_rms"][0] == cp[name]["update_rms"][0], name
        assert mup[name]["act_rms"][0] == cp[name]["act_rms"][0], name
    # deeper, mup adds twice the branches at full weight; completep halves each (m_L^-1 = 1/2)
    assert spread(mup[LAST_BLOCK]["update_rms"]) > 1.5 * spread(cp[LAST_BLOCK]["update_rms"])
    assert mup[LAST_BLOCK]["act_rms"][1] > cp[LAST_BLOCK]["act_rms"][1]


@pytest.mark.slow  # trains and draws: seconds
def test_command_writes_one_result_per_kind_and_the_figure(tmp_path, capsys):
    out = tmp_path / "cc"
    assert main(["coord-check", "--set", *TINY, "--depths", "2,4", "--kinds", "mup,completep", "--steps", "1",
                 "--seeds", "1", "-o", str(out)]) == 0
    data = json.loads((out / "coord_check.json").read_text())
    assert [d["kind"] for d in data] == ["mup", "completep"] and all(d["depths"] == [2, 4] for d in data)
    assert set(data[1]["layers"][LAST_BLOCK]) >= {"act_rms", "update_rms"}
    assert (out / "coord_check.png").stat().st_size > 20_000
    assert "blocks.last" in capsys.readouterr().out


@pytest.mark.parametrize("extra,needle", [(["--depths", "2,x"], "--depths: 'x' is not a positive integer"),
                                          (["--depths", "2,2"], "repeats a depth"),
                                          (["--depths", "2,4", "--widths", "32,64"], "not both"),
                                          (["--depths", "2,4", "--set", "model.arch=mlp", "data.source=synthetic",
                                            "data.in_dim=8"], "no residual blocks")])
def test_bad_input_is_one_line_exit_2(extra, needle, tmp_path, capsys):
    out = tmp_path / "cc"
    assert main(["coord-check", "--set", *TINY, *extra, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()
