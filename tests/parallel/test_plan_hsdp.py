"""The planner under HSDP (fsdp2 with dist.replicate): parameters, gradients and optimizer state
are sharded over one shard group (world / replicate ranks, or one node's ranks for replicate=-1),
while the batch is still split over every rank."""
import pytest

from fastwidth.cli import main
from fastwidth.config import for_width, load_config, resolve
from fastwidth.errors import ConfigError
from fastwidth.parallel import plan
from fastwidth.parallel.env import DistEnv
from fastwidth.parallel.plan import CHOICES, Choice, check_fits, plan_sweep, shard_group

SETS = ["model.arch=mlp", "data.source=synthetic", "model.depth=2", "model.width=256", "data.batch_size=16",
        "stats.enabled=false", "dist.backend=fsdp2"]
SHARDED = ("params", "grads", "optimizer")


def cfg_of(*extra):
    return resolve(load_config(None, [*SETS, *extra]))


def test_replicate_shards_over_one_group():
    hsdp, plain = plan_sweep(cfg_of("dist.replicate=2"), 8), plan_sweep(cfg_of(), 8)
    four = plan_sweep(cfg_of(), 4)
    for key in SHARDED:
        assert hsdp[key] == four[key], key
        assert hsdp[key] == pytest.approx(2 * plain[key]), key   # the factor the planner used to miss
    # the batch is still split over all 8 ranks
    assert hsdp["activations"] == plain["activations"] < four["activations"]
    assert hsdp["peak"] > plain["peak"]


def test_replicate_per_node_matches_replicate_two():
    per_node = plan_sweep(cfg_of("dist.replicate=-1"), 8, node_size=4)
    assert per_node == plan_sweep(cfg_of("dist.replicate=2"), 8)
    # one node holding every rank (no node size known): plain FSDP, as hsdp_layout makes it on one host
    assert plan_sweep(cfg_of("dist.replicate=-1"), 8) == plan_sweep(cfg_of(), 8)


@pytest.mark.parametrize("choice", [c for c in CHOICES if c.backend != "fsdp2"], ids=lambda c: c.label)
def test_replicate_leaves_other_engines_alone(choice):
    world = 1 if choice.backend == "none" else 8
    assert plan_sweep(cfg_of("dist.replicate=2"), world, choice) == plan_sweep(cfg_of(), world, choice)


def test_narrow_widths_under_ddp_keep_every_rank():
    """dist.shard_min_width: the narrow member runs under ddp, replicated on all ranks."""
    sweep = ["sweep.widths=[64,256]", "dist.shard_min_width=128"]
    hsdp, plain = plan_sweep(cfg_of("dist.replicate=2", *sweep), 8), plan_sweep(cfg_of(*sweep), 8)
    wide, narrow = (plan.member_plan(for_width(cfg_of(), w), c, 8) for w, c in ((256, Choice("fsdp2")), (64, Choice("ddp"))))
    assert hsdp["params"] - plain["params"] == pytest.approx(wide["params"])   # 4P/4 - 4P/8 of the wide one
    assert hsdp["params"] == pytest.approx(2 * wide["params"] + narrow["params"])


@pytest.mark.parametrize("extra,node,msg", [
    (["dist.replicate=3"], None, "dist.replicate=3 needs a rank count divisible by it, got 8 ranks"),
    (["dist.replicate=-1"], 3, r"ranks per node \(3\) to divide the 8 ranks"),
    (["dist.replicate=-1"], 16, r"ranks per node \(16\) to divide the 8 ranks")])
def test_bad_shard_group_is_one_line(extra, node, msg):
    with pytest.raises(ConfigError, match=msg):
        shard_group(cfg_of(*extra), 8, node)


def test_check_fits_refuses_on_the_shard_group(monkeypatch):
    """The start-of-run check: a budget between the plain FSDP and the HSDP peaks at 8 ranks."""
    plain, hsdp = plan_sweep(cfg_of(), 8)["peak"], plan_sweep(cfg_of("dist.replicate=2"), 8)["peak"]
    monkeypatch.setattr(plan, "device_budget", lambda cfg, env: ((plain + hsdp) / 2, "test budget"))
    env = DistEnv(world_size=8, backend="fsdp2")
    check_fits(cfg_of(), env)
    with pytest.raises(ConfigError, match=r"\(fsdp2, 8 ranks, shard groups of 4\)"):
        check_fits(cfg_of("dist.replicate=2"), env)
    # replicate=-1: the node size as the HSDP mesh counts it (node_key of every rank)
    from fastwidth.parallel import nodes
    monkeypatch.setattr(nodes, "node_keys", lambda env: ["GROUP_RANK=0"] * 4 + ["GROUP_RANK=1"] * 4)
    assert plan.ranks_per_node(env) == 4
    with pytest.raises(ConfigError, match="shard groups of 4"):
        check_fits(cfg_of("dist.replicate=-1"), env)
    monkeypatch.setattr(nodes, "node_keys", lambda env: ["host"] * 8)   # one node: plain FSDP fits
    check_fits(cfg_of("dist.replicate=-1"), env)


def test_plan_command_says_the_shard_group(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    (tmp_path / "empty.yaml").write_text("{}\n")
    base = ["plan", "--config", str(tmp_path / "empty.yaml"), "--set", *SETS, "model.width=16384", "dist.world_size=8"]   # 0.27 G parameters (meta)

    def table(*extra):
        assert main([*base, *extra]) == 0
        lines = capsys.readouterr().out.splitlines()
        return lines[1], lines[3:]          # the shard-group line, the table's rows

    note, rows = table("dist.replicate=-1", "--ranks-per-node", "4")
    assert note == "fsdp2 rows: HSDP, one replica group per node of 4 ranks (--ranks-per-node), shards over 4 of 8 ranks"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")                    # a launcher's node size
    assert table("dist.replicate=-1") == (note.replace("--ranks-per-node", "LOCAL_WORLD_SIZE"), rows)
    assert table("dist.replicate=2") == ("fsdp2 rows: HSDP, 2 replica groups, shards over 4 of 8 ranks", rows)
    note, plain = table()
    assert note == "fsdp2 rows: shards over all 8 ranks"
    fsdp2 = [i for i, r in enumerate(rows) if r.split()[0] == "fsdp2"]
    assert rows[:fsdp2[0]] == plain[:fsdp2[0]] and rows[fsdp2[-1] + 1:] == plain[fsdp2[-1] + 1:]
    params = float(rows[fsdp2[0]].split()[1])
    assert params > 0.2 and params == pytest.approx(2 * float(plain[fsdp2[0]].split()[1]), abs=0.011)
