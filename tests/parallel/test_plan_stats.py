"""The planner counts the statistics that run on one whole member (Engine.gathered): the gathered
view (4P parameters where the engine shards them, 4P of Adam's v̂ where it is not a torch tensor
already) plus the eigensolver's vectors, and coord's W_0 in the persistent state."""
from fastwidth.config import for_width, load_config
from fastwidth.parallel.plan import Choice, count_params, member_plan

SETS = ["model.arch=mlp", "data.source=synthetic", "model.depth=2", "stats.ntk_points=0", "stats.kernel_points=0",
        "stats.batch_sharpness_every=0", "stats.coord_every=0"]


def plans(*extra):
    cfg = for_width(load_config(None, [*SETS, *extra]), 512)
    counts = count_params(cfg)
    return counts["total"], {c.label: member_plan(cfg, c, 2, counts) for c in
                             (Choice("ddp"), Choice("fsdp2"), Choice("deepspeed", 2), Choice("deepspeed", 3))}


def test_gathered_member_and_solver_vectors_are_counted():
    p, on = plans("stats.sharpness_iters=10", "stats.sharpness_points=4")
    # Lanczos: 6 vectors + 10 of its basis, of 4P, on top of the view: ddp 0, ZeRO-2 v̂, sharded both
    for label, view in (("ddp", 0), ("zero2", 4 * p), ("fsdp2", 8 * p), ("zero3", 8 * p)):
        assert on[label]["eval"] >= (6 + 10) * 4 * p + view, label
    _, lanczos = plans("stats.sharpness_iters=0", "stats.batch_sharpness_every=5", "stats.batch_sharpness_iters=20")
    assert lanczos["fsdp2"]["eval"] >= (6 + 20) * 4 * p + 8 * p


def test_coord_keeps_w0_of_every_member():
    p, off = plans()
    _, on = plans("stats.coord_every=2")
    assert on["ddp"]["persistent"] - off["ddp"]["persistent"] == 4 * p
