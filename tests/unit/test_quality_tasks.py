"""benchmarks/quality/tasks.py: the study's generated tasks are deterministic, hold out their eval prompts,
answer correctly by construction, and their metrics score a perfect and an empty prediction as expected."""

from __future__ import annotations

import pytest

from benchmarks.quality.tasks import LEXICON, TASKS, final_number, gsm8k_accuracy, rouge_2


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_deterministic_and_disjoint(name):
    task = TASKS[name]
    train, evaluation = task.splits(500, 40, seed=0)
    assert (train, evaluation) == task.splits(500, 40, seed=0)
    assert len(train) == 500 and len({r["prompt"] for r in evaluation}) == 40
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    references = [r["response"] for r in evaluation]
    assert task.metric(references, references) == pytest.approx(100.0)
    assert task.metric([""] * len(references), references) == pytest.approx(0.0)


def test_rows_are_right_by_construction():
    train, _ = TASKS["arithmetic"].splits(300, 10, seed=1)
    for row in train:
        # The worked steps are valid equations and the last one answers the prompt.
        for step in row["response"].split(","):
            left, right = step.split("=")
            assert eval(left) == int(right), row  # noqa: S307 (digits and + - * only)
        assert eval(row["prompt"][:-1]) == int(final_number(row["response"])), row  # noqa: S307
    for row in TASKS["translation"].splits(50, 5, seed=1)[0]:
        source = row["prompt"][:-1].split()
        assert row["response"].split() == [LEXICON[w] for w in reversed(source)]
    for row in TASKS["summary"].splits(50, 5, seed=1)[0]:
        assert row["response"].split() == [w for w in row["prompt"][:-1].split() if w[0].isupper()]


def test_arithmetic_v2_rows_are_right_by_construction():
    train, evaluation = TASKS["arithmetic_v2"].splits(300, 10, seed=1)
    for row in train + evaluation:
        a, b, c = (int(d) for d in row["prompt"][:-1].split("+"))
        first, second = row["response"].split(",")
        # Two-digit worked steps, the second starting from the first's result; the last number answers the prompt.
        assert first == f"{a}+{b}={a + b:02d}" and second == f"{a + b:02d}+{c}={a + b + c:02d}", row
        assert int(final_number(row["response"])) == a + b + c


def test_task_settings_layering():
    import argparse

    from benchmarks.quality.study import TASK_DEFAULTS, parser, task_settings

    defaults = parser().parse_args([])
    assert task_settings("translation", defaults) == TASK_DEFAULTS  # the published tasks keep their sizes
    assert task_settings("arithmetic_v2", defaults) == {**TASK_DEFAULTS, "student_hidden": 64}
    given = argparse.Namespace(**{**vars(defaults), "student_hidden": 48, "teacher_steps": 10})
    assert task_settings("arithmetic_v2", given) == {**TASK_DEFAULTS, "student_hidden": 48, "teacher_steps": 10}
    assert parser().parse_args([]).tasks == ["arithmetic", "translation", "summary"]


def test_paper_scale_metrics():
    assert gsm8k_accuracy(["so 1,234 apples.", "it is 5"], ["work #### 1234", "work #### 6"]) == 50.0
    assert rouge_2(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)


@pytest.mark.parametrize("name", list(TASKS))
def test_dev_split_is_held_out_and_leaves_training_rows_unchanged(name):
    from benchmarks.quality.study import dev_rows

    task = TASKS[name]
    train, evaluation = task.splits(500, 40, seed=0)
    dev = dev_rows(task, 500, 40)
    assert len({r["prompt"] for r in dev}) == len(dev) > 0
    assert not {r["prompt"] for r in dev} & ({r["prompt"] for r in train} | {r["prompt"] for r in evaluation})
    assert task.splits(500 + 400, 40, seed=0)[0][:500] == train


def test_sweep_choice_is_the_best_mean_ratio_to_gkd():
    from benchmarks.quality.sweep import REFERENCE, relative_scores

    rows = [{"task": t, "method": m, "metric": v} for t, m, v in [
        ("a", REFERENCE, 50), ("b", REFERENCE, 10), ("a", "x", 25), ("a", "x", 75), ("b", "x", 5),
        ("a", "y", 10), ("b", "y", 20)]]
    scores = relative_scores(rows, ["a", "b"])
    assert scores["x"][0] == pytest.approx(0.75) and scores["x"][1] == {"a": 50.0, "b": 5.0}
    assert scores["y"][0] == pytest.approx((0.2 + 2.0) / 2)
