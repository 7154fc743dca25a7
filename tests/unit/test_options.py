"""The config block and the loss API share one vocabulary, one set of defaults and bounds and one "needs a teacher"
rule (`options.py`), and the loss's hyperparameters are read off the validated block field by field: nothing is
restated out of step."""

from __future__ import annotations

import math
import typing
from dataclasses import fields

import annotated_types
import pytest

from axolotl_xkd import options
from axolotl_xkd.args import XKDConfig
from axolotl_xkd.losses.divergence import REGISTRY
from axolotl_xkd.losses.xkd import XKDHyperparams

LOSS_FIELDS = [f.name for f in fields(XKDHyperparams) if f.name != "ignore_index"]


def test_every_loss_hyperparameter_is_a_config_key():
    assert set(LOSS_FIELDS) <= set(XKDConfig.model_fields), set(LOSS_FIELDS) - set(XKDConfig.model_fields)


@pytest.mark.parametrize("name", sorted(options.LOSS_CHOICES))
def test_config_and_loss_accept_the_same_values(name):
    assert typing.get_args(XKDConfig.model_fields[name].annotation) == options.LOSS_CHOICES[name]


@pytest.mark.parametrize("name", sorted(options.LOSS_BOUNDS))
def test_config_and_loss_share_the_bounds(name):
    bound = options.LOSS_BOUNDS[name]
    low, low_inclusive, high, high_inclusive = bound.low, bound.low_inclusive, bound.high, bound.high_inclusive
    found = {"low": -math.inf, "low_inclusive": True, "high": math.inf, "high_inclusive": False}
    for bound in XKDConfig.model_fields[name].metadata:
        if isinstance(bound, annotated_types.Ge | annotated_types.Gt):
            found["low"] = bound.ge if isinstance(bound, annotated_types.Ge) else bound.gt
            found["low_inclusive"] = isinstance(bound, annotated_types.Ge)
        if isinstance(bound, annotated_types.Le | annotated_types.Lt):
            found["high"] = bound.le if isinstance(bound, annotated_types.Le) else bound.lt
            found["high_inclusive"] = isinstance(bound, annotated_types.Le)
    assert (found["low"], found["low_inclusive"], found["high"], found["high_inclusive"]) == (
        low, low_inclusive, high, high_inclusive)


@pytest.mark.parametrize("name", sorted(options.LOSS_BOUNDS))
def test_loss_refuses_what_the_config_refuses(name):
    """Just outside each bound (and NaN) both the `xkd:` block and XKDHyperparams raise, naming the key."""
    bound = options.LOSS_BOUNDS[name]
    outside = [math.nan, bound.low if not bound.low_inclusive else bound.low - 0.5]
    if bound.high != math.inf:
        outside.append(bound.high if not bound.high_inclusive else bound.high + 0.5)
    for value in outside:
        with pytest.raises(ValueError, match=f"xkd.{name}"):
            XKDHyperparams(**{name: value})
        with pytest.raises(ValueError, match=name):
            XKDConfig(teacher={"source": "model", "path": "t"}, **{name: value})


def test_python_api_and_config_share_the_defaults():
    """XKDHyperparams() trains as an `xkd:` block with only a teacher does (one source: options.LOSS_DEFAULTS)."""
    config = XKDConfig(teacher={"source": "model", "path": "t"})
    assert {name: getattr(XKDHyperparams(), name) for name in LOSS_FIELDS} == {
        name: getattr(config, name) for name in LOSS_FIELDS}
    assert set(LOSS_FIELDS) == set(options.LOSS_DEFAULTS)


def test_every_token_divergence_has_one_registered_function():
    assert tuple(REGISTRY) == options.TOKEN_DIVERGENCES
    assert options.DIVERGENCES == (*options.TOKEN_DIVERGENCES, "sequence")


def test_hyperparams_read_every_field_off_the_block():
    from axolotl_xkd.wiring import hyperparams

    config = XKDConfig(teacher={"source": "model", "path": "t"}, divergence="reverse_kl", td_weight=0.05,
                       reward_kl_weight=0.2, q_form="logprobs", td_target="soft", reward_input="state", gamma=0.9)
    params = hyperparams(config)
    assert {name: getattr(params, name) for name in LOSS_FIELDS} == {name: getattr(config, name) for name in LOSS_FIELDS}


@pytest.mark.parametrize(
    ("settings", "reader"),
    [
        ({"divergence": "forward_kl", "alpha_kd": 1.0, "td_weight": 0.1, "td_target": "observed"}, "divergence"),
        ({"divergence": "sequence", "alpha_kd": 1.0, "td_weight": 0.1, "td_target": "observed"}, None),
        ({"divergence": "sequence", "alpha_kd": 1.0, "td_weight": 0.1, "td_target": "soft"}, None),
        ({"divergence": "sequence", "alpha_kd": 1.0, "td_weight": 0.1, "td_target": "teacher_logprob"}, "td_target"),
        ({"divergence": "sequence", "alpha_kd": 1.0, "td_weight": 0.0, "td_target": "teacher_expected"}, None),
        ({"divergence": "jsd", "alpha_kd": 0.0, "td_weight": 0.1, "td_target": "teacher_expected"}, "td_target"),
    ],
)
def test_one_needs_a_teacher_rule_for_config_and_loss(settings, reader):
    """The config refuses a missing teacher exactly when the loss would read one."""
    found = options.teacher_reader(**settings)
    assert (found is None) == (reader is None) and (reader is None or found.startswith(reader))
    assert XKDHyperparams(**settings).needs_teacher == (reader is not None)
    if reader is None:
        XKDConfig(**settings, alpha_ce=1.0)
    else:
        with pytest.raises(ValueError, match=f"xkd.teacher is missing, but {reader}"):
            XKDConfig(**settings, alpha_ce=1.0)
