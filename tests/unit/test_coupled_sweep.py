"""benchmarks.quality.coupled: the sweep's arms and its choice rule (the worst dev ratio to GKD over every cell)."""

from __future__ import annotations

import pytest

from benchmarks.quality.coupled import arms, carried, cell_ratios, choose, final


def test_arms_are_gkd_and_the_coupled_form_at_each_weight():
    table = arms(["fkl", "seq"], ["observed"], [0.1, 0.5], [1.0])
    assert table["gkd_fkl"] == {"divergence": "forward_kl", "reward_kl_weight": 0.0, "td_weight": 0.0}
    coupled = table["coupled_fkl_observed_r0.5_w1"]
    assert coupled["td_weight"] == 0.5 and coupled["reward_kl_weight"] == 1.0
    assert coupled["td_target"] == "observed" and coupled["reward_detach_backbone"] is False
    assert table["coupled_seq_observed_r0.1_w1"]["sequences"] == "teacher"  # SeqKD on the teacher's generations
    assert len(table) == 2 * (1 + 2)


def test_choice_is_the_highest_worst_ratio_over_complete_settings():
    def runs(method, task, *metrics):
        return [{"task": task, "method": method, "metric": m} for m in metrics]

    rows = [*runs("gkd_fkl", "a", 10, 10), *runs("gkd_fkl", "b", 20, 20),
            *runs("coupled_fkl_observed_r0.1_w1", "a", 11, 11), *runs("coupled_fkl_observed_r0.1_w1", "b", 18, 18),
            *runs("coupled_fkl_observed_r0.5_w1", "a", 15, 15), *runs("coupled_fkl_observed_r0.5_w1", "b", 16, 16),
            *runs("coupled_fkl_soft_r0.1_w1", "a", 30, 30)]  # incomplete: no task b
    ratios = cell_ratios(rows, ["a", "b"], ["fkl"])
    assert set(ratios) == {"observed_r0.1_w1", "observed_r0.5_w1"}
    assert ratios["observed_r0.1_w1"] == {("a", "fkl"): pytest.approx(1.1), ("b", "fkl"): pytest.approx(0.9)}
    assert choose(ratios) == "observed_r0.1_w1"  # worst 0.9 beats worst 0.8, though 0.5's mean is higher
    assert choose({}) is None


def test_the_screen_carries_its_best_settings_and_the_choice_is_among_them_on_every_seed():
    def run(method, task, seed, metric):
        return {"task": task, "method": method, "seed": seed, "metric": metric}

    rows = [run("gkd_fkl", "a", 0, 10), run("gkd_fkl", "a", 1, 10),
            run("coupled_fkl_observed_r0.1_w1", "a", 0, 12), run("coupled_fkl_observed_r0.1_w1", "a", 1, 8),
            run("coupled_fkl_observed_r0.5_w1", "a", 0, 11), run("coupled_fkl_observed_r0.5_w1", "a", 1, 11),
            run("coupled_fkl_soft_r0.1_w1", "a", 0, 9), run("coupled_fkl_soft_r0.1_w1", "a", 1, 30)]
    assert carried(rows, ["a"], ["fkl"], 2) == ["observed_r0.1_w1", "observed_r0.5_w1"]  # seed 0 only: 12, 11, 9
    assert carried(rows, ["a"], ["fkl"], 0) == ["observed_r0.1_w1", "observed_r0.5_w1", "soft_r0.1_w1"]
    ratios = final(rows, ["a"], ["fkl"], seeds=2, carry=2)
    assert set(ratios) == {"observed_r0.1_w1", "observed_r0.5_w1"}  # soft's seed 1 (30) is outside the choice
    assert choose(ratios) == "observed_r0.5_w1"  # two-seed means: 11 / 10 beats 10 / 10
    assert cell_ratios(rows[:3], ["a"], ["fkl"], seeds=2) == {}  # one seed of the coupled arm is not two


def test_trajectories_follow_sigma_squared_and_the_relative_td_pull_per_setting_and_step(tmp_path):
    import json

    from benchmarks.quality.coupled import force_plot, trajectories

    log = [{"step": 30, "xkd/reward_sigma": 0.9, "xkd/td_force": 0.1, "xkd/kd_force": 1.0}, {"step": 31, "loss": 1.0}]
    runs = [{"task": "a", "method": "coupled_fkl_observed_r0.1_w1", "seed": 0, "log": log},
            {"task": "b", "method": "coupled_jsd_observed_r0.1_w1", "seed": 0,
             "log": [{"step": 30, "xkd/reward_sigma": 1.0, "xkd/td_force": 0.3, "xkd/kd_force": 0.5}]},
            {"task": "a", "method": "gkd_fkl", "seed": 0, "log": [{"step": 30, "xkd/reward_sigma": 0.0}]}]
    history = tmp_path / "history.jsonl"
    history.write_text("".join(json.dumps(r) + "\n" for r in runs))
    curves = trajectories(history)
    assert list(curves) == ["observed_r0.1_w1"]  # GKD has no head; steps without the pulls are not points
    assert curves["observed_r0.1_w1"] == {30: [(pytest.approx(0.81), pytest.approx(0.1)), (1.0, pytest.approx(0.6))]}
    force_plot(history, tmp_path / "forces.png")
    assert (tmp_path / "forces.png").stat().st_size > 0
