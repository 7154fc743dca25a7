"""The nested `xkd:` block of an Axolotl config, as a pydantic schema (imports only the leaves `options` and
`unknown_keys`).

Axolotl merges `XKDArgs` into its own config model, so `axolotl train` validates the block with the
rest of the YAML; unknown keys inside `xkd:` are errors naming the closest known key, never silently ignored.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from axolotl_xkd.options import (
    CONFIDENCE_SCORES,
    DEFAULT_CHUNK_SIZE,
    DIVERGENCES,
    LOSS_BOUNDS,
    LOSS_DEFAULTS,
    MIXTURES,
    PRESETS,
    Q_FORMS,
    REWARD_INPUTS,
    TD_TARGETS,
    reward_reaches_student,
    teacher_reader,
)
from axolotl_xkd.teacher_args import (  # noqa: F401 (the teacher blocks are imported from here too)
    ModelTeacher,
    NamedTeacher,
    PrecomputedTeacher,
    ServerTeacher,
    check_base_url,
    generation_obstacle,
)
from axolotl_xkd.unknown_keys import check_known_keys

LOG = logging.getLogger(__name__)

Divergence = Literal[DIVERGENCES]


class GenerationSettings(BaseModel):
    """How responses are sampled: by the teacher for `sequences: teacher`, by the student for `on_policy`."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=1, description="Longest response; a prompt's row never exceeds sequence_len.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    batch_size: int | None = Field(
        None, ge=1, description="sequences: on_policy: most prompts per `generate` call. An on-policy step answers "
        "the distinct prompts of all its micro-batches together; set this to bound the memory of the KV cache "
        "(unset: one call per optimizer step). The samples do not depend on it."
    )


def _loss_key(name: str, description: str) -> Any:
    """The Field of the loss hyperparameter `name`: its default and bounds from options.py, shared with
    XKDHyperparams, so the `xkd:` block and the loss API called from Python agree."""
    bounds = LOSS_BOUNDS[name].pydantic() if name in LOSS_BOUNDS else {}
    return Field(LOSS_DEFAULTS[name], **bounds, description=description)


class XKDConfig(BaseModel):
    """Every option of XKD_METHOD.md; the defaults are the spec's except where the quality study recommends
    otherwise (w_kl = lambda = 0.1, q_form ava: see docs/getting_started.md)."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal[tuple(PRESETS)] | None = Field(
        None,
        description="Named settings of several keys; keys set beside it win. `coupled`: the spec's coupled X-KD, "
        "the reward terms pulling on the student (" + ", ".join(f"{k}: {v}" for k, v in PRESETS["coupled"].items())
        + "; the weights with the highest worst ratio to plain distillation over four tasks and four divergences in "
        "the quality study's dev sweep).",
    )
    teacher: ModelTeacher | PrecomputedTeacher | ServerTeacher | None = Field(
        None, description="Where the teacher distribution p_T comes from.", discriminator="source"
    )
    teachers: list[Annotated[NamedTeacher, Field(discriminator="source")]] | None = Field(
        None, min_length=1,
        description="Several teachers instead of `teacher`: a list of teacher blocks (any source, each with its own "
        "cross_tokenizer) with a `name` and a `weight`, combined as `mixture` says (docs/teachers.md#many-teachers).",
        examples=[[{"name": "maths", "source": "model", "path": "/models/maths"},
                   {"name": "code", "source": "model", "path": "/models/code", "weight": 2.0}]],
    )
    mixture: Literal[MIXTURES] | None = Field(
        None,
        description="How `teachers` combine (required with them): route, each row distilled from the teacher its "
        "`datasets:` entry names (`xkd_teacher: <name>` in the entry) or its `route_column` names; weighted, every "
        "teacher at every position, p = sum_i w_i p_i with the fixed weights (for teachers that agree: it collapsed with two specialists, docs/teachers.md#many-teachers); confidence, "
        "per-position weights, a softmax over each teacher's `confidence_score` plus its log weight.",
        examples=["route"],
    )
    route_column: str | None = Field(
        None, description="mixture: route: the dataset column holding each row's teacher name (read for the rows of "
        "entries that do not name their teacher with `xkd_teacher:`).",
        examples=["teacher"],
    )
    default_teacher: str | None = Field(
        None, description="mixture: route: the teacher of a row whose route column names none (empty or unknown), or "
        "of an entry's rows when neither the entry nor a route column names one; without it such a row is an error "
        "naming it.", examples=["general"],
    )
    confidence_score: Literal[CONFIDENCE_SCORES] = Field(
        "logprob",
        description="mixture: confidence: each teacher's score at a position: logprob, its log-prob of the observed "
        "next token (the teacher that predicts the data best leads; a confident but wrong teacher does not); "
        "neg_entropy, minus its entropy (no use of the observed token).",
    )
    confidence_temperature: float = Field(
        1.0, gt=0, description="mixture: confidence: temperature of the softmax over the teachers' scores (lower: "
        "closer to picking the best teacher at each position).",
    )
    mixture_top_k: int = Field(
        64, ge=1, description="Entries an in-process teacher of the student's tokenizer contributes to a mixture "
        "that also holds top-k teachers (a store, a server, another tokenizer); a mixture of such teachers only is "
        "formed over the whole vocabulary.",
    )
    generator: str | None = Field(
        None, description="sequences: teacher with `teachers`: the name of the teacher whose model samples every row's "
        "response in `axolotl xkd precompute` (a `source: model` item's path or a store's model_path, in the student's "
        "tokenizer); every store then records those rows. Required under weighted and confidence; under route, unset "
        "means each row's response is sampled by its routed teacher (docs/teachers.md#many-teachers).",
        examples=["maths"],
    )
    divergence: Divergence = _loss_key("divergence", "The distillation term D_i.")
    beta: float = _loss_key("beta", "JSD mixture weight (TRL GKD: 0 = forward KL, 1 = reverse KL).")
    skew_alpha: float = _loss_key("skew_alpha", "Skew of skew_forward_kl / skew_reverse_kl.")
    temperature: float = _loss_key("temperature", "tau, applied to student and teacher.")
    scale_by_tau_squared: bool = _loss_key("scale_by_tau_squared", "Multiply D_i by tau^2.")
    alpha_kd: float = _loss_key("alpha_kd", "Weight of the distillation term.")
    alpha_ce: float = _loss_key("alpha_ce", "Weight of the ground-truth cross-entropy term.")
    # Defaults and bounds of the loss's keys: options.LOSS_DEFAULTS / LOSS_BOUNDS, shared with XKDHyperparams
    # (w_kl = lambda = 0.1, not the spec's 1: docs/getting_started.md).
    reward_kl_weight: float = _loss_key("reward_kl_weight", "w_kl: weight of KL(q_phi(R) || prior).")
    td_weight: float = _loss_key("td_weight", "lambda: weight of the TD-consistency term.")
    gamma: float = _loss_key("gamma", "Discount in TD_i.")
    prior_std: float = _loss_key("prior_std", "Standard deviation of the reward prior N(0, s^2).")
    q_form: Literal[Q_FORMS] = _loss_key("q_form", "How Q(s, a) is read off z_i.")
    ava_alpha: float = _loss_key("ava_alpha", "Band width of q_form: ava.")
    # teacher_logprob (+ reward_detach_backbone), not the spec's observed, coupled form: docs/defaults.md.
    td_target: Literal[TD_TARGETS] = _loss_key(
        "td_target",
        "What the reward fits: Q(s,a) - gamma Q(s',a') at the observed tokens (observed) or under the "
        "teacher (teacher_expected); Q(s,a) - gamma V(s'), V = logsumexp Q (soft); log p_T(a|s) (teacher_logprob).",
    )
    reward_input: Literal[REWARD_INPUTS] = _loss_key(
        "reward_input", "Read R_i from h_{i+1} (next_state) or h_i (state)."
    )
    reward_detach_backbone: bool = Field(True, description="Stop the reward head's gradient into the student.")
    log_std_min: float = Field(-5.0, description="Lower clamp of log sigma_i.")
    log_std_max: float = Field(5.0, description="Upper clamp of log sigma_i.")
    topk_tail: bool = _loss_key("topk_tail", "Top-k teachers: keep the tail category (false: renormalise).")
    chunk_size: int = Field(
        DEFAULT_CHUNK_SIZE, ge=0,
        description="Positions per chunk of the fused, chunked loss; 0 = unchunked reference path.",
    )
    sequences: Literal["dataset", "teacher", "on_policy"] = Field(
        "dataset",
        description="Training sequences: the dataset's; the teacher's generations (a precompute --generate store); "
        "or, for on_policy_fraction of the steps, the student's own samples for the batch's prompts.",
    )
    on_policy_fraction: float = Field(
        0.5, ge=0, le=1, description="sequences: on_policy: share of optimizer steps trained on student samples "
        "(GKD's lambda); the other steps use the dataset's sequences."
    )
    generation: GenerationSettings = Field(
        default_factory=GenerationSettings, description="Sampling settings of sequences: teacher / on_policy."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Fill the preset's keys that the block does not set itself (so keys set beside it win); first refuse
        unknown keys at every level, each with the closest known one (extra="forbid" alone gives no hint)."""
        check_known_keys(cls, data, "xkd")
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _log_std_bounds(self) -> XKDConfig:
        if not self.log_std_min < self.log_std_max:
            raise ValueError(
                f"xkd.log_std_min ({self.log_std_min}) must be below xkd.log_std_max ({self.log_std_max})"
            )
        return self

    @model_validator(mode="after")
    def _something_to_train(self) -> XKDConfig:
        if self.alpha_kd + self.alpha_ce + self.reward_kl_weight + self.td_weight == 0:
            raise ValueError(
                "xkd: alpha_kd, alpha_ce, reward_kl_weight and td_weight are all 0, so the loss is 0; "
                "set at least alpha_kd or alpha_ce above 0"
            )
        return self

    @property
    def teacher_blocks(self) -> list[tuple[str, Any]]:
        """Every teacher block with the key it sits at, for messages: `xkd.teachers[i]` each, or `xkd.teacher` alone
        (none without a teacher)."""
        if self.teachers is not None:
            return [(f"xkd.teachers[{i}]", block) for i, block in enumerate(self.teachers)]
        return [] if self.teacher is None else [("xkd.teacher", self.teacher)]

    @model_validator(mode="after")
    def _teachers_combined(self) -> XKDConfig:
        check_mixture(self)
        return self

    @model_validator(mode="after")
    def _teacher_present(self) -> XKDConfig:
        reader = teacher_reader(divergence=self.divergence, alpha_kd=self.alpha_kd, td_weight=self.td_weight,
                                td_target=self.td_target)
        if not self.teacher_blocks and reader is not None:
            no_teacher = (" (the default target: the reward head learns the teacher's log-probs); without a teacher "
                          "set `td_target: observed` or, for no reward, `td_weight: 0, reward_kl_weight: 0`"
                          if reader.startswith("td_target") else "")
            raise ValueError(
                f"xkd.teacher is missing, but {reader} needs the teacher's distribution{no_teacher}; add e.g. "
                "`teacher: {source: model, path: /path/to/teacher}`"
            )
        return self

    @model_validator(mode="after")
    def _sequences_have_their_teacher(self) -> XKDConfig:
        sources = {block.source for _, block in self.teacher_blocks}
        check_generated(self)
        if self.sequences == "on_policy" and "precomputed" in sources:
            raise ValueError(
                "xkd.sequences: on_policy scores the student's fresh samples, which no precomputed store holds; use "
                "source: model or server for every teacher"
            )
        source = getattr(self.teacher, "source", None)
        if self.sequences == "teacher" and self.teachers is None and source != "precomputed":
            raise ValueError(
                "xkd.sequences: teacher trains on responses the teacher generated once with `axolotl xkd precompute "
                "CONFIG.yml --generate`; set `teacher: {source: precomputed, path: DIR}` to that store "
                f"(xkd.teacher.source is {source!r})"
            )
        return self

    @model_validator(mode="after")
    def _warn_unbounded(self) -> XKDConfig:
        if self.td_weight > self.reward_kl_weight:
            warn_once(
                f"xkd.td_weight ({self.td_weight}) > xkd.reward_kl_weight ({self.reward_kl_weight}): the objective "
                f"is bounded only by the log sigma clamp [{self.log_std_min}, {self.log_std_max}] "
                "(XKD_METHOD.md section 2)"
            )
        return self

    @model_validator(mode="after")
    def _warn_collapse_risk(self) -> XKDConfig:
        message = collapse_risk(self)
        if message is not None:
            warn_once(message)
        return self


def check_mixture(config: XKDConfig) -> None:
    """Refuse a `teachers` / `mixture` combination that cannot mean one thing, naming the key and what to do."""
    teachers, mixture = config.teachers, config.mixture
    if teachers is not None and config.teacher is not None:
        raise ValueError("xkd.teacher and xkd.teachers are both set; keep one: `teacher` for one teacher, `teachers` "
                         "(a list of named teacher blocks) for several")
    if teachers is None:
        extra = [key for key in MIXTURE_KEYS if _changed(config, key)]
        if extra:
            raise ValueError(f"xkd.{extra[0]} is read only with xkd.teachers (several teachers); remove it, or list "
                             "the teachers under `teachers:`")
        return
    names = [t.name for t in teachers]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        items = [i for i, n in enumerate(names) if n == twice[0]]
        raise ValueError(f"xkd.teachers: the name {twice[0]!r} is used by items {items}; "
                         "each teacher needs its own name (routing, stores and logs use it)")
    if mixture is None:
        raise ValueError(f"xkd.mixture is required with xkd.teachers: one of {', '.join(MIXTURES)} "
                         "(docs/teachers.md#many-teachers)")
    unread = {"route": ("confidence_score", "confidence_temperature"),
              "weighted": ("route_column", "default_teacher", "confidence_score", "confidence_temperature"),
              "confidence": ("route_column", "default_teacher")}[mixture]
    for key in unread:
        if _changed(config, key):
            raise ValueError(f"xkd.{key} is not read with xkd.mixture: {mixture}; remove it")
    if config.default_teacher is not None and config.default_teacher not in names:
        raise ValueError(f"xkd.default_teacher {config.default_teacher!r} is not one of xkd.teachers' names {names}")


def check_generated(config: XKDConfig) -> None:
    """Refuse `sequences: teacher` with `teachers` when it cannot say which model samples the responses or which
    stores hold them, naming the key and what to do."""
    teachers = config.teachers
    if config.generator is not None and (teachers is None or config.sequences != "teacher"):
        raise ValueError("xkd.generator is read only with xkd.teachers and xkd.sequences: teacher; remove it")
    if teachers is None or config.sequences != "teacher":
        return
    names = [t.name for t in teachers]
    if config.generator is not None and config.generator not in names:
        raise ValueError(f"xkd.generator {config.generator!r} is not one of xkd.teachers' names {names}")
    why = "samples the responses (xkd.generator)"
    if config.mixture == "route":
        live = [t.name for t in teachers if t.source != "precomputed"]
        if live:
            raise ValueError(f"xkd.sequences: teacher with xkd.mixture: route keeps each row in its teacher's store, "
                             f"but {live} are not `source: precomputed`; make every teacher a store (with model_path) "
                             "written by `axolotl xkd precompute CONFIG.yml` (live teachers under route cannot score "
                             "generated rows yet), or train on the dataset's sequences")
        if config.generator is None:
            why = "samples its routed rows' responses (xkd.mixture: route without xkd.generator)"
    elif config.generator is None:
        raise ValueError(f"xkd.sequences: teacher with xkd.mixture: {config.mixture} needs xkd.generator, the teacher "
                         f"whose model samples every response (one of {names})")
    elif all(t.source != "precomputed" for t in teachers):
        raise ValueError("xkd.sequences: teacher with xkd.teachers needs a `source: precomputed` teacher: its store, "
                         "written by `axolotl xkd precompute CONFIG.yml`, holds the generated rows training reads")
    for i, block in enumerate(teachers):
        problem = generation_obstacle(block) if config.generator in (None, block.name) else None
        if problem is not None:
            raise ValueError(f"xkd.teachers[{i}] ({block.name!r}) {why} but {problem}; name a teacher that can "
                             "(a `source: model` item, or a store with model_path, of the student's tokenizer)")


def _changed(config: XKDConfig, key: str) -> bool:
    """Whether `key` holds another value than its default (Axolotl validates the block, then hands the plugin the
    block with every default filled in, so which keys were written cannot be told)."""
    return getattr(config, key) != type(config).model_fields[key].default


MIXTURE_KEYS = ("mixture", "route_column", "default_teacher", "confidence_score", "confidence_temperature",
                "mixture_top_k")
"""The keys that configure how `xkd.teachers` combine."""

RECOMMENDED = {"td_target": "teacher_logprob", "reward_detach_backbone": True}
"""The safe setting (docs/defaults.md), the defaults: the reward terms train only the reward head, so the student
trains on D_i exactly as GKD's does, with any divergence."""

# Above this TD weight the study's reverse-KL students and its `q_form: logits` / `logprobs` students fell apart.
_TD_WEIGHT_LIMIT = 0.1
# Bounded divergences: their gradient fades as the student leaves the teacher, the TD term's pull does not.
_BOUNDED = ("skew_forward_kl", "skew_reverse_kl", "tvd")
_LOGGED: set[str] = set()


def reaches_student(config: XKDConfig) -> bool:
    """Whether the reward terms change the student's weights (options.reward_reaches_student)."""
    return reward_reaches_student(td_target=config.td_target, detach_backbone=config.reward_detach_backbone)


def collapse_risk(config: XKDConfig) -> str | None:
    """The warning for a setting the quality study saw collapse the student, or one that fades as those did, naming
    what to use instead; None when safe (always with the defaults, whose reward terms cannot reach the student).
    Which settings and why: docs/getting_started.md#the-warning."""
    if config.td_weight == 0 or not reaches_student(config):
        return None
    where = f"xkd.divergence: {config.divergence} with xkd.td_weight {config.td_weight}"
    if config.alpha_kd > 0 and config.divergence == "jsd":
        risk = f"{where} is a setting that collapsed in the quality study"
    elif config.alpha_kd > 0 and config.divergence in _BOUNDED:
        risk = f"{where} risks collapse: {config.divergence} is bounded like JSD, which collapsed with the TD term"
    elif config.td_weight <= _TD_WEIGHT_LIMIT:
        return None
    elif config.alpha_kd > 0 and config.divergence == "reverse_kl":
        risk = (f"{where} (above {_TD_WEIGHT_LIMIT}) is a setting that collapsed in the quality study (with "
                f"reverse_kl keep td_weight and reward_kl_weight at most {_TD_WEIGHT_LIMIT})")
    elif config.q_form != "ava":
        risk = (f"xkd.q_form: {config.q_form} with xkd.td_weight {config.td_weight} (above {_TD_WEIGHT_LIMIT}) "
                "wrecked the student in the quality study")
    else:
        return None
    return (
        f"{risk} (docs/getting_started.md#the-warning). Use the defaults "
        f"`{', '.join(f'{key}: {value}' for key, value in RECOMMENDED.items())}` (docs/defaults.md: the reward head "
        f"then learns without pulling on the student), or `td_weight: 0, reward_kl_weight: 0` for plain "
        f"{config.divergence} distillation."
    )


def warn_once(message: str) -> None:
    """Log `message` as a warning once per process: the `xkd:` block may be validated more than once per run."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        LOG.warning(message)


class XKDArgs(BaseModel):
    """What the plugin adds to Axolotl's config: the `xkd:` block, checked against the rest."""

    xkd: XKDConfig | None = Field(None, description="X-KD settings; every key: docs/config.md.")

    @model_validator(mode="before")
    @classmethod
    def _compatible_with_axolotl_config(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("xkd") is None:
            return data
        if data.get("rl"):
            raise ValueError(f"xkd: cannot be combined with rl: {data['rl']!r}; X-KD is its own trainer")
        for key in ("reward_model", "process_reward_model", "kd_trainer"):
            if data.get(key):
                raise ValueError(f"xkd: cannot be combined with {key}: true; remove one of them")
        # Context parallelism shards each sequence inside Axolotl's base collator, but not the X-KD
        # collators' per-token teacher tensors, so the two would disagree position by position.
        degree = int(data.get("context_parallel_size") or data.get("sequence_parallel_degree") or 1)
        if degree > 1:
            raise ValueError(
                f"xkd: cannot be combined with context_parallel_size: {degree} (context parallelism); the X-KD "
                "teacher signal is not sharded along the sequence. Remove context_parallel_size (and "
                "sequence_parallel_degree) or set it to 1; use DeepSpeed ZeRO-3 for memory instead."
            )
        return data
