"""The nested `xkd:` block of an Axolotl config, as a pydantic schema (imports only the leaves `options` and
`unknown_keys`).

Axolotl merges `XKDArgs` into its own config model, so `axolotl train` validates the block with the
rest of the YAML; unknown keys inside `xkd:` are errors naming the closest known key, never silently ignored.
"""

from __future__ import annotations

import logging
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from axolotl_xkd.options import (
    DEFAULT_CHUNK_SIZE,
    DIVERGENCES,
    DTYPE_NAMES,
    LOSS_BOUNDS,
    LOSS_DEFAULTS,
    PRESETS,
    Q_FORMS,
    REWARD_INPUTS,
    TD_TARGETS,
    reward_reaches_student,
    teacher_reader,
)
from axolotl_xkd.unknown_keys import check_known_keys

LOG = logging.getLogger(__name__)

Divergence = Literal[DIVERGENCES]


class CrossTokenizerKeys(BaseModel):
    """The two keys that allow a teacher of another tokenizer, with one meaning in every teacher block."""

    model_config = ConfigDict(extra="forbid")

    cross_tokenizer: bool = Field(
        False,
        description="Allow a teacher whose tokenizer differs from the student's: each sequence is re-tokenized with "
        "the teacher's tokenizer and the teacher's distributions projected onto the student's positions by byte "
        "spans, each teacher token's mass given to the student token its bytes start with. The same in every "
        "source: in-process, server (which needs tokenizer_path) and precomputed (`axolotl xkd precompute` aligns "
        "the teacher as it writes the store; training checks the store was written so) (docs/cross_tokenizer.md).",
    )
    cross_tokenizer_top_k: int = Field(
        64, ge=1, description="With cross_tokenizer: student tokens kept per position (plus the student's own next "
        "token), as a top-k signal in student ids.",
    )


class ModelTeacher(CrossTokenizerKeys):
    """An in-process teacher: a causal LM loaded once, in eval mode, without gradients."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["model"] = Field("model", description="Run the teacher in the training process.")
    path: str = Field(description="Hugging Face model directory (or hub id) of the teacher.")
    tokenizer_path: str | None = Field(
        None, description="Tokenizer to compare with the student's; defaults to `path`."
    )
    dtype: Literal[DTYPE_NAMES] | None = Field(
        None, description="Teacher weights dtype; default: the student's dtype."
    )
    attn_implementation: str | None = Field(
        None, description="Attention kernel of the teacher; default: the student's."
    )
    trust_remote_code: bool = Field(False, description="Passed to from_pretrained.")
    offload: bool = Field(
        False,
        description="DeepSpeed ZeRO-3 only: keep the sharded teacher's parameters in CPU memory (gathered to the "
        "device layer by layer in its forward). Without ZeRO-3 the teacher is placed whole on every rank.",
    )


class PrecomputedTeacher(CrossTokenizerKeys):
    """Teacher top-k log-probs stored with the data by `axolotl xkd precompute` (or Axolotl's KD v2 format)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["precomputed"] = Field("precomputed", description="Train from stored teacher top-k.")
    path: str = Field(description="Folder written by `axolotl xkd precompute` (or a KD v2 dataset, see format).")
    top_k: int | None = Field(None, ge=1, description="k expected in the data; default: whatever was stored.")
    format: Literal["xkd", "axolotl_kd_v2"] = Field(
        "xkd",
        description="xkd: a precompute folder with manifest.json; axolotl_kd_v2: a tokenized dataset (folder "
        "saved with save_to_disk, or .jsonl/.json/.parquet) with input_ids, labels, target_token_ids, logprobs.",
    )
    model_path: str | None = Field(
        None, description="Teacher model `axolotl xkd precompute` runs (else pass --teacher)."
    )


class ServerTeacher(CrossTokenizerKeys):
    """A teacher server returning the prompt's log-probs: vLLM or `axolotl xkd serve-teacher` (completions with
    prompt_logprobs), or SGLang (its native /generate, with `api: sglang`)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["server"] = Field("server", description="Ask a teacher server for top-k log-probs.")
    base_url: str = Field(description="Server root, e.g. http://127.0.0.1:8000 (requests go to /v1/...).")
    model: str | None = Field(None, description="Served model name; default: the first one /v1/models lists.")
    top_k: int = Field(20, ge=1, description="Teacher log-probs per position (vLLM: at most its --max-logprobs).")
    timeout_s: float = Field(120.0, gt=0, description="Limit of one HTTP attempt, connect to last byte.")
    max_retries: int = Field(3, ge=0, description="Retries of a failed request before the run stops.")
    retry_backoff_s: float = Field(0.5, ge=0, description="Wait before the first retry; doubles on each further one.")
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    request_tokens: int = Field(
        8192, ge=1, description="Tokens per request: a batch's sequences go out as prompts of a few requests."
    )
    prefetch: int = Field(2, ge=0, description="Training batches whose requests are sent ahead of their step.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (sent as a Bearer token)."
    )
    api: Literal["vllm", "sglang"] = Field(
        "vllm",
        description="How the server is asked: vllm, /v1/completions with prompt_logprobs (vLLM, `axolotl xkd "
        "serve-teacher`); sglang, SGLang's native /generate with input log-probs (its /v1/completions ignores "
        "prompt_logprobs). Checked at start against the /v1/models card's owned_by (docs/teachers.md#teacher-server).",
        examples=["sglang"],
    )
    tokenizer_path: str | None = Field(
        None, description="With cross_tokenizer (required there): the served model's tokenizer, folder or hub id; "
        "checked against the server's at start.",
    )

    @model_validator(mode="after")
    def _http_url(self) -> ServerTeacher:
        check_base_url(self.base_url, "xkd.teacher.base_url")
        return self

    @model_validator(mode="after")
    def _cross_tokenizer_names_the_tokenizer(self) -> ServerTeacher:
        if self.cross_tokenizer and self.tokenizer_path is None:
            raise ValueError(
                "xkd.teacher.tokenizer_path is required with xkd.teacher.cross_tokenizer: true (source: server): the "
                "student's text is re-tokenized with the teacher's tokenizer before it is sent. Set it to the served "
                "model's tokenizer (the folder `axolotl xkd serve-teacher --model` or `vllm serve` loaded)."
            )
        return self

    @model_validator(mode="after")
    def _tokenizer_path_only_across_tokenizers(self) -> ServerTeacher:
        if self.tokenizer_path is not None and not self.cross_tokenizer:
            raise ValueError(
                f"xkd.teacher.tokenizer_path={self.tokenizer_path!r} (source: server) is read only with "
                "xkd.teacher.cross_tokenizer: true; without it the server's tokenizer is checked against the "
                "student's. Remove tokenizer_path, or set cross_tokenizer: true for a teacher of another tokenizer."
            )
        return self


def check_base_url(url: str, key: str) -> None:
    """Raise unless `url` (given as `key`) is a server root of the form http(s)://HOST[:PORT][/path]."""
    example = "e.g. http://127.0.0.1:8000"
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{key}={url!r} must start with http:// or https://, {example}")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number in 0-65535)
    except ValueError:
        raise ValueError(f"{key}={url!r} has a port that is not a number in 0-65535, {example}") from None
    if not parts.hostname:
        raise ValueError(f"{key}={url!r} names no host after {parts.scheme}://, {example}")
    if parts.query or parts.fragment:
        raise ValueError(f"{key}={url!r} is a server root: requests go to <root>/v1/...; drop the ?query or #part")


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

    @model_validator(mode="after")
    def _teacher_present(self) -> XKDConfig:
        reader = teacher_reader(divergence=self.divergence, alpha_kd=self.alpha_kd, td_weight=self.td_weight,
                                td_target=self.td_target)
        if self.teacher is None and reader is not None:
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
        source = getattr(self.teacher, "source", None)
        if self.sequences == "teacher" and source != "precomputed":
            raise ValueError(
                "xkd.sequences: teacher trains on responses the teacher generated once with `axolotl xkd precompute "
                "CONFIG.yml --generate`; set `teacher: {source: precomputed, path: DIR}` to that store "
                f"(xkd.teacher.source is {source!r})"
            )
        if self.sequences == "on_policy" and source == "precomputed":
            raise ValueError(
                "xkd.sequences: on_policy scores the student's fresh samples, which no precomputed store holds; use "
                "xkd.teacher.source: model or server"
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
