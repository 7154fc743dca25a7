"""Training sequences that are not the dataset's: prompts cut out of collated batches, responses sampled
from a causal LM, and batches rebuilt from the two.

Used by `axolotl xkd precompute --generate` (the teacher's responses), by on-policy steps (the student's)
and by best-of-n reranking; `right_pad` is the one right-padding helper of the package. Imports torch, numpy
and losses.positions only; the model is anything with HF's `generate`.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor, nn

from axolotl_xkd.args import GenerationSettings
from axolotl_xkd.keys import ROUTE
from axolotl_xkd.losses.positions import IGNORE_INDEX


def pad_token_id(tokenizer) -> int:
    """The id right padding uses: the tokenizer's pad token if set, else its EOS, else 0. Padding sits outside the
    attention mask and the labels, so its value changes no result; one rule keeps every batch alike."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def segments(batch: dict[str, Tensor]) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sequence in a collated batch: padding (attention_mask 0) left out, packed rows
    split where position_ids restart at 0 (or the attention_mask's segment number changes)."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = (torch.ones_like(input_ids) if mask is None else mask).cpu().numpy()
    positions = batch.get("position_ids")
    positions = None if positions is None else positions.cpu().numpy()
    out = []
    for b in range(input_ids.shape[0]):
        valid = np.flatnonzero(mask[b] != 0)
        if valid.size == 0:
            continue
        start = prev = int(valid[0])
        for t in valid[1:].tolist():
            restart = positions is not None and positions[b, t] == 0
            if restart or t != prev + 1 or mask[b, t] != mask[b, prev]:
                out.append((b, start, prev + 1))
                start = t
            prev = t
        out.append((b, start, prev + 1))
    return out


def prompt_of(input_ids, labels) -> list[int] | None:
    """A sequence's prompt: its tokens before the first label (at least one); None when it has no label.

    A multi-turn sequence keeps only its first prompt: the responses replace everything after it.
    """
    answered = np.flatnonzero(np.asarray(labels) != IGNORE_INDEX)
    return None if answered.size == 0 else [int(t) for t in input_ids[: max(int(answered[0]), 1)]]


def prompt_to_answer(input_ids, labels, *, eos_id: int | None) -> list[int] | None:
    """What a teacher answers for a row: its prompt (`prompt_of`), or, for a row with no label at all, the whole row
    (a prompt without an answer, as a prompts-only dataset holds; a trailing EOS dropped). None for an empty row."""
    prompt = prompt_of(input_ids, labels)
    if prompt is not None:
        return prompt
    tokens = [int(t) for t in input_ids]
    if tokens and eos_id is not None and tokens[-1] == eos_id:
        tokens = tokens[:-1]
    return tokens or None


def prompts_of(batch: dict[str, Tensor]) -> list[list[int]]:
    """The prompt of every sequence of `batch` that has a response (sequences without labels are left out)."""
    return [prompt for prompt, _ in _prompts_with_segments(batch)]


def routes_of(batch: dict[str, Tensor]) -> list[int]:
    """The teacher (`keys.ROUTE`, under `mixture: route`) of each sequence `prompts_of` returns, in the same order."""
    route = batch[ROUTE].cpu()
    return [int(route[b, start]) for _, (b, start, _) in _prompts_with_segments(batch)]


def _prompts_with_segments(batch: dict[str, Tensor]) -> list[tuple[list[int], tuple[int, int, int]]]:
    """(prompt, segment) of every sequence of `batch` that has a response."""
    input_ids = batch["input_ids"].cpu().numpy()
    labels = batch["labels"].cpu().numpy()
    found = ((prompt_of(input_ids[b, start:end], labels[b, start:end]), (b, start, end))
             for b, start, end in segments(batch))
    return [(p, segment) for p, segment in found if p is not None]


def prompt_seed(seed: int, step: int, prompt: list[int] | tuple[int, ...]) -> int:
    """The sampling seed of one prompt at one optimizer step: a hash of (seed, step, prompt), the same on every
    rank, after a resume and whatever other prompts share its generation batch."""
    digest = hashlib.blake2b(f"{seed}:{step}:{list(prompt)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class RowSeededSampling:
    """A logits processor that samples every row from its own generator (the Gumbel-max trick), for greedy decoding.

    argmax(logits + Gumbel noise) is a draw from softmax(logits), so with `do_sample=False` after the temperature and
    top-p processors each row is sampled as HF's sampling would sample it, but its noise comes from a generator seeded
    for that row alone: a row's sample does not depend on its batch neighbours (HF's sampling draws every row from the
    one global generator, so a row's sample depends on the rows before it).
    """

    def __init__(self, seeds: list[int], device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device, dtype=torch.float32)
                               for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(torch.float32).tiny)))
        return scores.float() + gumbel


@torch.inference_mode()
def sample_responses(model: nn.Module, prompts: list[list[int]], sampling: GenerationSettings, *, pad_id: int,
                     eos_id: int | None, n: int = 1, max_length: int | None = None,
                     seeds: list[int] | None = None) -> list[list[int]]:
    """n responses per prompt (prompt-major), each cut after its first EOS and to `max_length` tokens with its
    prompt. Prompts are left-padded into one batch (KV cache on); sampling draws from torch's global generator, or,
    with `seeds` (one per response), each response from its own (`RowSeededSampling`). Greedy (temperature 0): the
    one answer, n times."""
    if sampling.temperature == 0 and n > 1:
        # Greedy decoding has one answer per prompt (generate refuses num_return_sequences > 1 without sampling).
        once = sample_responses(model, prompts, sampling, pad_id=pad_id, eos_id=eos_id, max_length=max_length)
        return [response for response in once for _ in range(n)]
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    budget = sampling.max_new_tokens
    if max_length is not None:
        budget = min(budget, max_length - min(map(len, prompts)))
    if budget < 1:
        return [[] for _ in range(len(prompts) * n)]
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    generated = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=budget, num_return_sequences=n, pad_token_id=pad_id,
        eos_token_id=eos_id, use_cache=True,  # training configs often turn the model's cache off
        **_decoding(sampling, seeds, device),
    )
    responses = []
    for k, row in enumerate(generated[:, width:].tolist()):
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)
        room = budget if max_length is None else max_length - len(prompts[k // n])
        responses.append(row[: min(cut, room)])
    return responses


def _decoding(sampling: GenerationSettings, seeds: list[int] | None, device: torch.device) -> dict:
    """generate's decoding arguments: greedy at temperature 0; HF's sampling; or, with per-response `seeds`, greedy
    over HF's own temperature and top-p processors followed by `RowSeededSampling`."""
    if sampling.temperature == 0:
        return {"do_sample": False}
    if seeds is None:
        return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": None}
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    processors = [TemperatureLogitsWarper(sampling.temperature)]
    if sampling.top_p < 1:
        processors.append(TopPLogitsWarper(sampling.top_p))
    processors.append(RowSeededSampling(seeds, device))
    return {"do_sample": False, "top_k": None, "logits_processor": LogitsProcessorList(processors)}


def response_rows(prompts: list[list[int]], responses: list[list[int]]) -> list[dict[str, list[int]]]:
    """Axolotl's tokenized rows: input_ids = prompt + response, labels masked (-100) over the prompt."""
    return [{"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r} for p, r in zip(prompts, responses)]


def right_pad(sequences: list, pad_value: int) -> tuple[Tensor, Tensor]:
    """`sequences` (lists or 1-D arrays) as one (B, T) long tensor right-padded with `pad_value`, and the (B, T)
    long mask that is 1 on their own tokens (an attention_mask)."""
    width = max(map(len, sequences))
    values = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, sequence in enumerate(sequences):
        values[b, : len(sequence)] = torch.as_tensor(np.asarray(sequence, dtype=np.int64))
        mask[b, : len(sequence)] = 1
    return values, mask


def collate_rows(rows: list[dict[str, list[int]]], *, pad_id: int, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Right-padded input_ids, labels, attention_mask (and position_ids when `like` has them, the route column when
    the rows have it), one sequence per row, on the device and with the dtypes of the batch `like`."""
    ids, mask = right_pad([r["input_ids"] for r in rows], pad_id)
    labels, _ = right_pad([r["labels"] for r in rows], IGNORE_INDEX)
    width = ids.shape[1]
    device = like["input_ids"].device
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if ROUTE in rows[0]:  # each sequence's teacher, -1 on padding
        batch[ROUTE], _ = right_pad([r[ROUTE] for r in rows], -1)
    if "position_ids" in like:
        batch["position_ids"] = torch.arange(width).expand(len(rows), width).clone()
    return {k: v.to(device=device, dtype=like[k].dtype if k in like else v.dtype) for k, v in batch.items()}
