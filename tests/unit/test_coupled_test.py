"""benchmarks.quality.coupled_test: the decision rule fixed before the test runs, the data-efficiency fraction, the
quality-diversity dominance and the arms, on hand-made rows."""

from __future__ import annotations

import csv
import json

import pytest

from benchmarks.quality import study
from benchmarks.quality.coupled_test import (
    ahead_beyond_spread,
    arm_blocks,
    chosen_setting,
    decision,
    dominates,
    efficiency,
    fraction_to_reach,
    metrics,
    planned,
    qd_points,
)

SETTING = "observed_r0.25_w1"


def rows(task: str, method: str, fraction: float, *values: float) -> list[dict]:
    return [{"task": task, "method": method, "seed": s, "data_fraction": fraction, "metric": v}
            for s, v in enumerate(values)]


def test_arms_are_sft_gkd_and_the_coupled_form_at_the_setting():
    arms = arm_blocks(SETTING, ["fkl", "seq"])
    assert set(arms) == {"sft", "gkd_fkl", f"coupled_fkl_{SETTING}", "gkd_seq", f"coupled_seq_{SETTING}"}
    coupled = arms[f"coupled_fkl_{SETTING}"]
    assert coupled["td_weight"] == 0.25 and coupled["reward_kl_weight"] == 1.0 and coupled["td_target"] == "observed"
    assert arms["gkd_seq"]["divergence"] == "sequence" and arms["gkd_seq"]["td_weight"] == 0.0
    assert arms["sft"] == study.METHODS["sft"]


def test_an_incomplete_sweep_is_refused(tmp_path):
    path = tmp_path / "sweep.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["task", "method", "seed", "metric"])
        writer.writeheader()
        writer.writerows([{"task": "a", "method": "gkd_fkl", "seed": 0, "metric": 10},
                          {"task": "a", "method": f"coupled_fkl_{SETTING}", "seed": 0, "metric": 11},
                          {"task": "a", "method": "coupled_fkl_soft_r0.1_w1", "seed": 0, "metric": 12}])
    assert chosen_setting(path, ["a"], ["fkl"], seeds=1, carry=0) == "soft_r0.1_w1"
    with pytest.raises(SystemExit, match="not complete"):
        chosen_setting(path, ["a", "b"], ["fkl"], seeds=1, carry=0)
    with pytest.raises(SystemExit, match="0 of 1 carried settings at 2 seeds"):  # the screen's best lacks seed 1
        chosen_setting(path, ["a"], ["fkl"], seeds=2, carry=1)


def test_ahead_beyond_spread_is_mean_minus_std_above_mean_plus_std():
    assert ahead_beyond_spread([10, 12], [7, 7])  # 11 - 1 > 7 + 0
    assert not ahead_beyond_spread([10, 12], [8, 10])  # 10 < 9 + 1: the bands touch


def test_the_rule_needs_the_floor_everywhere_and_two_tasks_ahead_with_forward_kl():
    base = [*rows("a", "gkd_fkl", 1.0, 10, 10), *rows("b", "gkd_fkl", 1.0, 20, 20),
            *rows("a", "gkd_tvd", 1.0, 10, 10), *rows("b", "gkd_tvd", 1.0, 10, 10)]
    ahead = [*rows("a", f"coupled_fkl_{SETTING}", 1.0, 12, 12), *rows("b", f"coupled_fkl_{SETTING}", 1.0, 22, 22)]
    level = [*rows("a", f"coupled_tvd_{SETTING}", 1.0, 10, 10), *rows("b", f"coupled_tvd_{SETTING}", 1.0, 10, 10)]
    adopt, lines = decision(metrics(base + ahead + level), ["a", "b"], ["fkl", "tvd"], SETTING)
    assert adopt and "**Adopt**" in lines[-1]
    below = [*rows("a", f"coupled_tvd_{SETTING}", 1.0, 9, 9), *rows("b", f"coupled_tvd_{SETTING}", 1.0, 10, 10)]
    adopt, lines = decision(metrics(base + ahead + below), ["a", "b"], ["fkl", "tvd"], SETTING)
    assert not adopt and "every cell: no" in lines[-1]  # 0.9x GKD with TVD on task a
    one_task = [*rows("a", f"coupled_fkl_{SETTING}", 1.0, 12, 12), *rows("b", f"coupled_fkl_{SETTING}", 1.0, 20, 20)]
    assert not decision(metrics(base + one_task + level), ["a", "b"], ["fkl", "tvd"], SETTING)[0]
    assert decision(metrics(base), ["a"], ["fkl"], SETTING) == (False, ["incomplete: a fkl"])


def test_fraction_to_reach_interpolates_between_measured_fractions():
    assert fraction_to_reach({0.1: 5.0, 0.3: 15.0, 1.0: 20.0}, 10.0) == pytest.approx(0.2)
    assert fraction_to_reach({0.1: 12.0, 0.3: 15.0, 1.0: 20.0}, 10.0) == 0.1
    assert fraction_to_reach({0.1: 5.0, 0.3: 6.0, 1.0: 8.0}, 10.0) is None


def test_efficiency_reports_the_fraction_with_a_bootstrap_interval():
    by = metrics([*rows("a", "m", 0.1, 5, 5), *rows("a", "m", 0.3, 15, 15), *rows("a", "m", 1.0, 20, 20)])
    assert efficiency(by, "a", "m", [1.0, 0.3, 0.1], [10.0, 10.0]) == "0.20 [0.20, 0.20]"
    assert efficiency(by, "a", "m", [1.0, 0.3, 0.1], [30.0, 30.0]) == "> 1 [> 1, > 1]"
    assert efficiency(by, "b", "m", [1.0, 0.3, 0.1], [10.0]) == "incomplete"


def test_quality_diversity_points_and_dominance():
    def run(method, seed, sampled):
        return {"task": "a", "method": method, "seed": seed, "data_fraction": 1.0, "metric": 0,
                "sampled": json.dumps({t: {"metric": q, "distinct2": d, "self_bleu": 50.0}
                                       for t, (q, d) in sampled.items()})}

    runs = [run("x", 0, {"0.5": (60, 0.3), "1": (40, 0.5)}), run("x", 1, {"0.5": (62, 0.3), "1": (42, 0.5)}),
            run("y", 0, {"0.5": (50, 0.2), "1": (30, 0.4)})]
    x, y = qd_points(runs, "a", "x"), qd_points(runs, "a", "y")
    assert x["0.5"] == [(60, 0.3, 50.0), (62, 0.3, 50.0)] and set(y) == {"0.5", "1"}
    assert dominates(x, y) and not dominates(y, x) and not dominates(x, x)


def test_the_subsets_train_the_data_efficiency_arms_only():
    names = [*arm_blocks(SETTING, ["fkl", "jsd", "seq"]), "trl_minillm_sft_lr0.001"]
    todo = planned(["a"], names, 2, [1.0, 0.1], SETTING, done={("a", "sft", 0, 1.0)})
    assert ("a", "sft", 0, 1.0) not in todo and ("a", "sft", 1, 1.0) in todo
    assert {m for _, m, _, f in todo if f == 1.0} == set(names)
    assert {m for _, m, _, f in todo if f == 0.1} == {"sft", "gkd_fkl", "gkd_seq", f"coupled_fkl_{SETTING}",
                                                       f"coupled_seq_{SETTING}", "trl_minillm_sft_lr0.001"}
    assert [s for _, _, s, _ in todo] == sorted(s for _, _, s, _ in todo)  # seed-major: a cut run has whole seeds


def test_a_gkd_cell_at_zero_is_passed_by_any_score_and_shown_so():
    runs = [*rows("a", "gkd_tvd", 1.0, 0, 0), *rows("a", f"coupled_tvd_{SETTING}", 1.0, 19, 17)]
    _, lines = decision(metrics(runs), ["a"], ["tvd"], SETTING)
    assert "| a | tvd | 18.0 ± 1.4 | 0.0 ± 0.0 | inf |" in lines  # the sample std (stats.summary), as the study
    assert "every cell: yes" in lines[-1]
