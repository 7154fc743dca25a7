"""The safe setting (the defaults): every shipped config uses it, and coupled settings the quality study saw
collapse warn once."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import yaml

from axolotl_xkd.args import RECOMMENDED, XKDConfig, collapse_risk
from axolotl_xkd.options import COUPLED_FORM

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*REPO.glob("example_configs/*.yml"), *REPO.glob("benchmarks/quality/configs/*.yml")])
TEACHER = {"source": "model", "path": "teacher"}
# The spec's coupled form: the TD term pulls on the student's Q and the head's gradient reaches its body.
COUPLED = COUPLED_FORM


def starter_snippet() -> dict:
    """The YAML block of docs/getting_started.md, the one users paste."""
    text = (REPO / "docs" / "getting_started.md").read_text()
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))


def test_every_shipped_config_is_found():
    names = {p.name for p in SHIPPED}
    assert {"xkd_llama.yml", "xkd_llama_multinode.yml", "xkd_llama_lora.yml", "xsum_xkd.yml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_uses_the_starter_setting(path):
    block = XKDConfig.model_validate(yaml.safe_load(path.read_text())["xkd"])
    assert collapse_risk(block) is None
    assert {key: getattr(block, key) for key in RECOMMENDED} == RECOMMENDED


def test_docs_snippet_is_the_starter_setting():
    snippet = starter_snippet()
    assert snippet["plugins"] == ["axolotl_xkd.XKDPlugin"]
    block = XKDConfig.model_validate(snippet["xkd"])
    assert collapse_risk(block) is None
    assert {key: getattr(block, key) for key in RECOMMENDED} == RECOMMENDED


def test_defaults_are_the_safe_setting():
    block = XKDConfig(teacher=TEACHER)
    assert {key: getattr(block, key) for key in RECOMMENDED} == RECOMMENDED


@pytest.mark.parametrize(
    "settings,flagged",
    [
        ({}, False),
        ({"divergence": "jsd"}, True),  # collapsed even at 0.1 on a held-out task
        ({"divergence": "jsd", "td_weight": 1.0, "reward_kl_weight": 1.0}, True),
        ({"divergence": "jsd", "td_weight": 0.0, "reward_kl_weight": 0.0}, False),  # plain GKD JSD
        ({"divergence": "skew_forward_kl"}, True),
        ({"divergence": "skew_reverse_kl"}, True),
        ({"divergence": "tvd"}, True),
        ({"divergence": "reverse_kl"}, False),
        ({"divergence": "reverse_kl", "td_weight": 0.5, "reward_kl_weight": 0.5}, True),
        ({"divergence": "forward_kl", "td_weight": 1.0, "reward_kl_weight": 1.0}, False),
        ({"q_form": "logits", "td_weight": 1.0, "reward_kl_weight": 1.0}, True),
        ({"q_form": "logprobs", "td_weight": 1.0, "reward_kl_weight": 1.0}, True),
        ({"q_form": "logits"}, False),  # lambda 0.1 worked in the sweep (1.05 of GKD)
        ({"divergence": "sequence", "td_weight": 1.0, "reward_kl_weight": 1.0}, False),
    ],
)
def test_collapse_risk_follows_the_evidence(settings, flagged):
    message = collapse_risk(XKDConfig(teacher=TEACHER, **COUPLED, **settings))
    assert (message is not None) == flagged, message
    if flagged:
        assert "td_target: teacher_logprob, reward_detach_backbone: True" in message
        assert "docs/defaults.md" in message


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl",
                                        "tvd", "sequence"])
@pytest.mark.parametrize("weight", [0.1, 1.0])
def test_defaults_never_flagged(divergence, weight):
    """With the defaults the reward terms cannot reach the student, whatever the divergence and weights."""
    config = XKDConfig(teacher=TEACHER, divergence=divergence, td_weight=weight, reward_kl_weight=weight)
    assert collapse_risk(config) is None


@pytest.mark.parametrize("settings", [{"td_target": "observed"}, {"reward_detach_backbone": False},
                                      {"td_target": "soft", "reward_detach_backbone": True}])
def test_either_coupling_is_flagged(settings):
    """A TD target built from the student's Q, or a head whose gradient reaches the body, can collapse JSD."""
    assert collapse_risk(XKDConfig(teacher=TEACHER, divergence="jsd", **settings)) is not None


def warnings_from(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "axolotl_xkd.args" and r.levelno == logging.WARNING]


def test_collapse_warning_is_logged_once_per_process(caplog):
    """The block may be validated several times per run; the warning appears once."""
    settings = {"teacher": TEACHER, **COUPLED, "divergence": "jsd", "td_weight": 0.037, "reward_kl_weight": 0.037}
    with caplog.at_level(logging.WARNING, logger="axolotl_xkd.args"):
        for _ in range(3):
            XKDConfig(**settings)
    assert warnings_from(caplog) == [collapse_risk(XKDConfig(**settings))]


def test_unbounded_warning_is_logged_once_per_process(caplog):
    with caplog.at_level(logging.WARNING, logger="axolotl_xkd.args"):
        for _ in range(3):
            XKDConfig(teacher=TEACHER, td_weight=0.093, reward_kl_weight=0.05)
    logged = warnings_from(caplog)
    assert len(logged) == 1 and "xkd.td_weight (0.093) > xkd.reward_kl_weight (0.05)" in logged[0]
