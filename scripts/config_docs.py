"""Writes docs/config.md, the `xkd:` key reference, from the pydantic schema in `args.py`.

    python -m scripts.config_docs            # rewrite docs/config.md
    python -m scripts.config_docs --check    # exit 1 if docs/config.md is stale

Key, type, bounds and default come from each `Field`; the description is the `Field` description followed by
NOTES (facts a one-line description leaves out). The example is the `Field`'s `examples` if set, else EXAMPLES.
A unit test renders the page in memory and compares it with the committed file. Imports only `args` (a leaf)
and pydantic, never the training stack. A repository tool, run from the checkout's root: not in the installed
package.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from axolotl_xkd.args import GenerationSettings, ModelTeacher, PrecomputedTeacher, ServerTeacher, XKDConfig
from axolotl_xkd.options import ENTRY_TEACHER
from axolotl_xkd.teacher_args import Named

PAGE = Path(__file__).resolve().parents[1] / "docs" / "config.md"

# (heading, YAML path of the block, schema class, text after the class docstring under the heading)
SECTIONS: list[tuple[str, str, type[BaseModel], str]] = [
    ("The `xkd:` block", "xkd", XKDConfig,
     "The notation is the spec's ([XKD_METHOD.md](XKD_METHOD.md)). Unknown keys inside `xkd:` are errors (Axolotl "
     "ignores unknown top-level keys; this block does not), each named with the closest key of its block: "
     "``unknown key xkd.divergance (did you mean `divergence`?)``."),
    ("`xkd.teacher` with `source: model`", "xkd.teacher", ModelTeacher,
     "It runs on every rank: under ZeRO-3 sharded across all ranks as a DeepSpeed stage-3 inference engine (no "
     "optimizer state), otherwise loaded whole once per rank. See [teachers.md](teachers.md)."),
    ("`xkd.teacher` with `source: precomputed`", "xkd.teacher", PrecomputedTeacher,
     "See [teachers.md](teachers.md#precomputed-teacher)."),
    ("`xkd.teacher` with `source: server`", "xkd.teacher", ServerTeacher,
     "See [teachers.md](teachers.md#teacher-server)."),
    ("An item of `xkd.teachers`", "xkd.teachers[]", Named,
     "Each item is a teacher block of any source above (`source: model` or `server`; its own `cross_tokenizer`) "
     "with these two keys added. See [teachers.md](teachers.md#many-teachers)."),
    ("`xkd.generation`", "xkd.generation", GenerationSettings,
     "See [teachers.md](teachers.md#sequence-sources-teacher-generations-and-on-policy-x-kd)."),
]

NOTES: dict[str, str] = {
    "XKDConfig.teacher": "Required unless no term reads the teacher (`divergence: sequence` or `alpha_kd: 0`, "
    "with `td_target` `observed` or `soft`, or the reward terms off).",
    "XKDConfig.divergence": "`forward_kl` KL(p_T‖pi), `reverse_kl` KL(pi‖p_T), `jsd` (generalized JSD), "
    "`skew_forward_kl`, `skew_reverse_kl` (DistiLLM), `tvd` (total variation), `sequence` (SeqKD: "
    "-log pi(a_i|s_i) on the data's tokens).",
    "XKDConfig.beta": "beta KL(p_T‖m) + (1-beta) KL(pi‖m), m = beta p_T + (1-beta) pi. `beta: 0` is forward KL "
    "KL(p_T‖pi), `beta: 1` is reverse KL KL(pi‖p_T) (the mixture formula itself vanishes there; other tools swap "
    "the two).",
    "XKDConfig.skew_alpha": "KL(p_T‖a p_T + (1-a) pi), KL(pi‖a pi + (1-a) p_T).",
    "XKDConfig.temperature": "Top-k teachers: the k+1 categories are rescaled and renormalised.",
    "XKDConfig.alpha_ce": "CE(z_i, a_i), at temperature 1.",
    "XKDConfig.reward_kl_weight": "KL(N(mu_i, sigma_i^2)‖N(0, prior_std^2)).",
    "XKDConfig.td_weight": "-log N(TD_i; mu_i, sigma_i^2). With `td_weight: 0` and `reward_kl_weight: 0` the loss is "
    "exactly the plain distillation loss (GKD) and no reward head is created. A warning is logged when "
    "lambda > w_kl (the objective is then bounded only by the log-sigma clamp).",
    "XKDConfig.gamma": "TD_i = Q(s_i, a_i) - gamma Q(s'_i, a'_i).",
    "XKDConfig.q_form": "`ava` Q = log_softmax(ava_alpha softmax(z/tau)) (AVA), `logits` Q = z/tau (AVRIL's "
    "Boltzmann Q-network, the spec's first form), `logprobs` Q = log_softmax(z/tau). The default follows the "
    "[quality study](quality.md)'s sweep: with `logits` the TD term wrecks the student on every task.",
    "XKDConfig.td_target": "`observed`: TD_i = Q(s_i, a_i) - gamma Q(s'_i, a_{i+1}) (its sum over a response "
    "telescopes to about Q(s_0, a_0)). `teacher_expected`: each Q replaced by its expectation under the teacher's "
    "next-token distribution (top-k teachers: the tail category takes the student-weighted mean of Q over the "
    "tokens outside the top k). `soft`: TD_i = Q(s_i, a_i) - gamma V(s'_i), V = logsumexp Q (sums to the "
    "student's log-likelihood plus V(s_0)). `teacher_logprob`: TD_i = log p_T(a_i | s_i), a fixed target, so "
    "the head learns the teacher's log-likelihood; the default, since with `reward_detach_backbone: true` no reward "
    "term then reaches the student ([defaults.md](defaults.md)). Formulas: [XKD_METHOD.md](XKD_METHOD.md) "
    "section 2.",
    "XKDConfig.reward_detach_backbone": "With it the head's gradient is also clipped apart from the student's "
    "(`max_grad_norm`; DeepSpeed and FSDP clip all parameters together). `false` is the spec's coupled form: the "
    "head's gradient shapes the student's hidden states.",
    "XKDConfig.reward_input": "`next_state` reads the state a_i leads to; `state` is AVRIL's state-only form.",
    "XKDConfig.log_std_min": "Must be below `log_std_max`.",
    "XKDConfig.topk_tail": "True compares k+1 categories (top k plus the tail holding the missing mass); `false` "
    "renormalises the top k, as other tools do.",
    "XKDConfig.chunk_size": "The loss is fused with the output layer: per chunk it forms the student's (and an "
    "in-process teacher's) logits, every X-KD term and their gradients, so the full (N, V) logits never exist. "
    "Under ZeRO-3 the loss runs as the output layer's own forward, so DeepSpeed gathers the weight once for it "
    "and once for its gradient; an in-process teacher's head is gathered once per batch. Output layers that are "
    "not a plain Linear (softcapped, scaled, LoRA-wrapped) use the unchunked path. See "
    "[loss_memory.md](loss_memory.md).",
    "XKDConfig.sequences": "`teacher` needs `teacher.source: precomputed` (the store written by "
    "`axolotl xkd precompute --generate`); `on_policy` needs a `model` or `server` teacher. See "
    "[teachers.md](teachers.md#sequence-sources-teacher-generations-and-on-policy-x-kd).",
    "ModelTeacher.tokenizer_path": "Every token (special and added ones included) must have the same id, else "
    "training stops with an error naming `xkd.teacher.path` and the differing tokens. Extra padded rows in either "
    "output layer are allowed: both distributions are cut to the tokenizer's length.",
    "ModelTeacher.offload": "`offload: true` without ZeRO-3 is an error.",
    "PrecomputedTeacher.top_k": "A store with another k is refused.",
    "PrecomputedTeacher.format": "In KD v2 data, entry i is the distribution over token i+1.",
    "ServerTeacher.max_retries": "The error names the server and the cause.",
    "ServerTeacher.api_key_env": "Never read from the YAML, never logged.",
    "ServerTeacher.tokenizer_path": "Set without cross_tokenizer it is an error (the server's tokenizer is then "
    "checked against the student's).",
    "XKDConfig.preset": "The start-up line (`axolotl_xkd ... active: {...}`) shows the effective settings. What the "
    "coupled form measured against plain distillation: docs/defaults.md.",
}

EXAMPLES: dict[str, Any] = {
    "XKDConfig.preset": "coupled",
    "XKDConfig.teacher": {"source": "model", "path": "runs/tiny/teacher"},
    "XKDConfig.divergence": "jsd",
    "XKDConfig.beta": 0.3,
    "XKDConfig.skew_alpha": 0.2,
    "XKDConfig.temperature": 2.0,
    "XKDConfig.scale_by_tau_squared": False,
    "XKDConfig.alpha_kd": 0.5,
    "XKDConfig.alpha_ce": 0.5,
    "XKDConfig.reward_kl_weight": 1.0,
    "XKDConfig.td_weight": 1.0,
    "XKDConfig.gamma": 0.9,
    "XKDConfig.prior_std": 2.0,
    "XKDConfig.q_form": "logprobs",
    "XKDConfig.ava_alpha": 2.0,
    "XKDConfig.td_target": "observed",
    "XKDConfig.reward_input": "state",
    "XKDConfig.reward_detach_backbone": False,
    "XKDConfig.log_std_min": -3.0,
    "XKDConfig.log_std_max": 3.0,
    "XKDConfig.topk_tail": False,
    "XKDConfig.chunk_size": 0,
    "XKDConfig.sequences": "on_policy",
    "XKDConfig.on_policy_fraction": 1.0,
    "XKDConfig.generation": {"max_new_tokens": 64, "temperature": 0.9},
    "ModelTeacher.source": "model",
    "ModelTeacher.path": "runs/tiny/teacher",
    "ModelTeacher.tokenizer_path": "runs/tiny/tokenizer",
    "ModelTeacher.dtype": "bfloat16",
    "ModelTeacher.attn_implementation": "flash_attention_2",
    "ModelTeacher.trust_remote_code": True,
    "ModelTeacher.offload": True,
    "PrecomputedTeacher.source": "precomputed",
    "PrecomputedTeacher.path": "runs/tiny/teacher_topk",
    "PrecomputedTeacher.top_k": 64,
    "PrecomputedTeacher.format": "axolotl_kd_v2",
    "PrecomputedTeacher.model_path": "runs/tiny/teacher",
    "ServerTeacher.source": "server",
    "ServerTeacher.base_url": "http://127.0.0.1:8000",
    "ServerTeacher.model": "teacher",
    "ServerTeacher.top_k": 64,
    "ServerTeacher.timeout_s": 300.0,
    "ServerTeacher.max_retries": 5,
    "ServerTeacher.retry_backoff_s": 1.0,
    "ServerTeacher.concurrency": 4,
    "ServerTeacher.request_tokens": 4096,
    "ServerTeacher.prefetch": 4,
    "ServerTeacher.api_key_env": "TEACHER_API_KEY",
    "ServerTeacher.cross_tokenizer": True,
    "ServerTeacher.tokenizer_path": "runs/tiny/teacher",
    "GenerationSettings.max_new_tokens": 64,
    "GenerationSettings.temperature": 0.0,
    "GenerationSettings.top_p": 0.9,
    "GenerationSettings.batch_size": 16,
}

BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def yaml_value(value: Any) -> str:
    """A value as it would be written in flow-style YAML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, BaseModel):
        return yaml_value(value.model_dump())
    return str(value)


def type_text(annotation: Any) -> str:
    """`float`, `forward_kl` | `jsd`, ..., `str or null`; a nested block by its YAML name."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(f"`{a}`" for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        if all(isinstance(a, type) and issubclass(a, BaseModel) for a in options):
            text = "block, one of " + ", ".join(f"`source: {a.model_fields['source'].default}`" for a in options)
        else:
            text = " | ".join(type_text(a) for a in options)
        return f"{text} or null" if len(options) < len(get_args(annotation)) else text
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "block"
    return getattr(annotation, "__name__", str(annotation))


def bounds_text(field: FieldInfo) -> str:
    """The numeric bounds of a field, e.g. `>= 0, <= 1`."""
    found = [f"{sign} {getattr(m, name)}" for m in field.metadata for name, sign in BOUNDS if hasattr(m, name)]
    return ", ".join(found)


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "the block's defaults"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{yaml_value(field.default)}`"


def example_text(key: str, name: str, field: FieldInfo) -> str:
    if field.examples:
        value = field.examples[0]
    elif key in EXAMPLES:
        value = EXAMPLES[key]
    elif field.default not in (None, PydanticUndefined):
        value = field.default
    else:
        return ""
    return f"`{name}: {yaml_value(value)}`"


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def table(schema: type[BaseModel]) -> list[str]:
    """One row per key of `schema`: key, type and bounds, default, description, example."""
    lines = ["| key | type | default | description | example |", "|---|---|---|---|---|"]
    for name, field in schema.model_fields.items():
        key = f"{schema.__name__}.{name}"
        kind = type_text(field.annotation)
        if bounds := bounds_text(field):
            kind = f"{kind}, {bounds}"
        description = " ".join(part for part in (field.description or "", NOTES.get(key, "")) if part)
        row = [f"`{name}`", kind, default_text(field), description, example_text(key, name, field)]
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return lines


def render() -> str:
    """The whole page, as committed in docs/config.md."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m scripts.config_docs` from the Field descriptions in axolotl_xkd/args.py "
        "(and NOTES / EXAMPLES in scripts/config_docs.py). Do not edit by hand: tests/unit/test_config_docs.py "
        "fails when this page is stale. -->",
        "",
    ]
    for heading, path, schema, intro in SECTIONS:
        summary = " ".join((schema.__doc__ or "").split())
        lines += [f"## {heading}", "", f"YAML path: `{path}`. {summary} {intro}", "", *table(schema), ""]
    return "\n".join(lines + ENTRY_SECTION)


# The one key the plugin reads outside `xkd:`: Axolotl's schema of a dataset entry holds no plugin keys, so it has no
# Field to render; routing.check_entry_teachers is its validation.
ENTRY_SECTION = [
    f"## `{ENTRY_TEACHER}` in a `datasets:` entry",
    "",
    "YAML path: `datasets[]` and `test_datasets[]`. The one key the plugin reads outside `xkd:`. Axolotl drops keys "
    "of a dataset entry it does not know, so the plugin reads it from the raw YAML when Axolotl registers it. See "
    "[teachers.md](teachers.md#many-teachers).",
    "",
    "| key | type | default | description | example |",
    "|---|---|---|---|---|",
    f"| `{ENTRY_TEACHER}` | str or null | `null` | xkd.mixture: route: the teacher (a name of `xkd.teachers`) of every "
    "row of this entry, whose rows then do not read `route_column`. Refused without `mixture: route` and when no "
    f"teacher has the name, naming `datasets[i].{ENTRY_TEACHER}`. | `{ENTRY_TEACHER}: maths` |",
    "",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PAGE, help=f"page to write (default: {PAGE})")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the page is stale")
    args = parser.parse_args()
    page = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != page:
            sys.exit(f"{args.out} is stale; run `python -m scripts.config_docs`")
        return
    args.out.write_text(page)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
