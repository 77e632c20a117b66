"""V_N and b² of three outputs (raw true logit, centered true logit, log p_y) on planted truths."""
import math

import torch

from fastwidth.stats.ensemble import SeedEnsembles, late_variance_slope, output_rows, output_values
from stats_toys import SEEDS, WIDTHS, shifted_logit_family as family

def _rows(sigs, n_boot=200):
    raw = SeedEnsembles({w: torch.stack([s["true_logit"] for s in ss]) for w, ss in sigs.items()},
                        {w: SEEDS for w in sigs}, max(WIDTHS))
    rows, fit = output_rows(sigs, {w: SEEDS for w in sigs}, max(WIDTHS), n_boot)
    return raw.width_rows(n_boot), raw.fit_row(n_boot), rows, fit


def test_a_per_seed_shift_of_every_logit_is_in_raw_v_n_only():
    still, moved = family(shift=0.0), family(shift=2.0)        # the same draws of F and ε (one rng order)
    raw0, _, rows0, _ = _rows(still, 0)
    raw1, _, rows1, _ = _rows(moved, 0)
    for w in WIDTHS:
        for s in ("_centered", "_logp"):                          # free of the shift: unchanged to fp32
            assert math.isclose(rows1[w][f"seed_variance{s}"], rows0[w][f"seed_variance{s}"], rel_tol=1e-4, abs_tol=1e-9)
            assert math.isclose(rows1[w].get(f"bias_sq_debiased{s}", 0.0), rows0[w].get(f"bias_sq_debiased{s}", 0.0),
                                rel_tol=1e-3, abs_tol=1e-7)
        # raw V_N carries Var_s c = 4 on top of var_scale/N <= 0.016
        assert raw1[w]["seed_variance"] > 100 * raw0[w]["seed_variance"]
        assert raw1[w]["seed_variance"] > 1.0


def test_planted_one_over_n_variance_gives_slope_minus_one_for_all_three():
    _, fit_raw, rows, fit = _rows(family(var_scale=0.2), 400)
    for slope, ci in ((fit_raw["variance_slope"], fit_raw["variance_slope_ci"]),
                      (fit["variance_slope_centered"], fit["variance_slope_centered_ci"]),
                      (fit["variance_slope_logp"], fit["variance_slope_logp_ci"])):
        assert abs(slope + 1) < 0.1 and ci[0] < -1 < ci[1], (slope, ci)
    # centering removes 1/C of each point's noise variance: E V_N centered = (C-1)/C·var/N < var/N
    assert all(rows[w]["seed_variance_centered"] < 0.95 * 0.2 / w for w in WIDTHS)
    assert rows[32]["bias_sq_debiased_centered_ci"] is not None and "bias_sq_debiased_centered" not in rows[256]


def test_old_signatures_form_the_centered_logit_from_logits_else_leave_it_out():
    old_classifier = family(centered=False)
    for ss in old_classifier.values():
        for s in ss:
            want = s["true_logit"] - s["logits"].mean(-1)
            torch.testing.assert_close(output_values(s, "_centered"), want)
    rows, fit = output_rows(old_classifier, {w: SEEDS for w in WIDTHS}, max(WIDTHS), 0)
    assert "seed_variance_centered" in rows[64] and "variance_slope_centered" in fit
    old_lm = family(centered=False, keep_logits=False)
    rows, fit = output_rows(old_lm, {w: SEEDS for w in WIDTHS}, max(WIDTHS), 0)
    assert "seed_variance_centered" not in rows[64] and "variance_slope_centered" not in fit
    assert "seed_variance_logp" in rows[64] and "variance_slope_logp" in fit


def test_late_variance_slope_is_fit_rows_slope_at_one_step_and_minus_one_over_steps():
    seeds = {w: SEEDS for w in WIDTHS}
    steps = [{w: torch.stack([s["true_logit"] for s in ss]) for w, ss in family(var_scale=0.2, seed=k).items()}
             for k in range(3)]
    fit = SeedEnsembles(steps[0], seeds, max(WIDTHS)).fit_row(300)
    slope, ci, values = late_variance_slope(steps[:1], seeds, max(WIDTHS), 300)
    assert slope == fit["variance_slope"] and ci == fit["variance_slope_ci"]
    slope, ci, values = late_variance_slope(steps, seeds, max(WIDTHS), 300)
    assert abs(slope + 1) < 0.1 and ci[0] < -1 < ci[1]
    assert math.isclose(values[64], 0.2 / 64, rel_tol=0.2)
