"""The schema of one teacher block (`xkd.teacher`, or an item of `xkd.teachers`): where the teacher distribution
comes from (in-process, precomputed store, server), each source's keys. Imports pydantic and `options` only; `args.py`
builds the `xkd:` block from these."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from axolotl_xkd.options import DTYPE_NAMES


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


class Named(BaseModel):
    """What an item of `xkd.teachers` adds to a teacher block: its name (routing, stores and logs use it) and its
    weight in a mixture."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="The teacher's name: what a routed row's route column holds, its logs' xkd/teacher/<name>/ "
        "prefix. Letters, digits, `_`, `.`, `-`.", examples=["maths"],
    )
    weight: float = Field(
        1.0, gt=0, description="Its weight in `mixture: weighted` (normalised over the teachers that have a "
        "distribution at a position) and its prior weight in `mixture: confidence`; `route` does not read it.",
    )


class NamedModelTeacher(ModelTeacher, Named):
    """An in-process teacher of `xkd.teachers`."""


class NamedPrecomputedTeacher(PrecomputedTeacher, Named):
    """A precomputed teacher of `xkd.teachers`."""


class NamedServerTeacher(ServerTeacher, Named):
    """A server teacher of `xkd.teachers`."""


NamedTeacher = NamedModelTeacher | NamedPrecomputedTeacher | NamedServerTeacher


def generation_obstacle(block: ModelTeacher | PrecomputedTeacher | ServerTeacher) -> str | None:
    """Why the teacher `block` cannot sample responses (`sequences: teacher`), or None when it can: a model run in
    the precompute's process, in the student's tokenizer (a `source: model` block's path, a store's model_path)."""
    if block.source == "server":
        return "is a teacher server, which is only asked for log-probs (responses are sampled by a model loaded here)"
    if block.cross_tokenizer:
        return "has another tokenizer (cross_tokenizer: true); responses are sampled in the student's tokenizer"
    if block.source == "precomputed" and block.model_path is None:
        return "has no model_path, the model that would sample the responses"
    return None
