"""Sample packing (sdpa, CPU): the X-KD loss of a packed row equals the loss of the same sequences unpacked.

The packed row comes from Axolotl's own multipack collator (V2BatchSamplerDataCollatorForSeq2Seq), the
unpacked batch from its padding collator (DataCollatorForSeq2Seq). Segment boundaries reach the
attention and the loss through `position_ids` only (they restart at 0 in each segment): transformers
builds the block-diagonal sdpa mask from them, and xkd_loss ends every segment's TD chain there.
"""

from __future__ import annotations

import torch
from axolotl.utils.collators.batching import DataCollatorForSeq2Seq, V2BatchSamplerDataCollatorForSeq2Seq

from axolotl_xkd.losses.reward_head import VariationalRewardHead
from axolotl_xkd.losses.xkd import xkd_loss
from axolotl_xkd.teachers.model import ModelTeacherSource
from axolotl_xkd.tiny import arithmetic_rows, build_model, build_tokenizer
from tests.support import spec_params


def _features(tokenizer, rows):
    """Tokenized samples as Axolotl's dataset holds them: prompt masked in labels, EOS appended."""
    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = prompt + response
        out.append({"input_ids": ids, "labels": [-100] * len(prompt) + response, "attention_mask": [1] * len(ids),
                    "position_ids": list(range(len(ids)))})
    return out


def _loss(batch, student, head, teacher, params, eos):
    # The model sees input_ids and position_ids; the packed row's segment-numbered attention_mask is
    # Axolotl's varlen patch input, which plain transformers would read as a padding mask.
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if batch["attention_mask"].max() == 1:
        inputs["attention_mask"] = batch["attention_mask"]
    out = student(**inputs, output_hidden_states=True, use_cache=False)  # as the trainer calls it
    mean, log_std = head(out.hidden_states[-1])
    return xkd_loss(out.logits, batch["labels"], teacher=teacher.get_signal(inputs), mu=mean,
                    log_sigma=log_std, params=params, position_ids=batch["position_ids"], eos_token_id=eos)


def test_packed_loss_equals_unpacked():
    tokenizer = build_tokenizer()
    student = build_model(tokenizer, hidden=32, layers=2, seed=1).eval()
    student.config._attn_implementation = "sdpa"
    teacher = ModelTeacherSource(build_model(tokenizer, hidden=32, layers=2, seed=2).eval(), len(tokenizer))
    head = VariationalRewardHead(32)
    torch.nn.init.normal_(head.proj.weight, std=0.3)  # non-zero rewards so the TD term couples positions
    params = spec_params(divergence="jsd", alpha_ce=0.5, gamma=0.9)
    features = _features(tokenizer, arithmetic_rows(5, seed=3, max_operand=99))

    packed = V2BatchSamplerDataCollatorForSeq2Seq(tokenizer, return_tensors="pt", padding=True)([features])
    assert packed["input_ids"].shape[0] == 1 and (packed["position_ids"] == 0).sum() == len(features)
    unpacked = DataCollatorForSeq2Seq(tokenizer, return_tensors="pt", padding=True)(features)
    assert unpacked["input_ids"].shape[0] == len(features)

    with torch.no_grad():
        got = _loss(packed, student, head, teacher, params, tokenizer.eos_token_id)
        want = _loss(unpacked, student, head, teacher, params, tokenizer.eos_token_id)
    assert got.num_tokens == want.num_tokens > 0
    for name in ("loss", "divergence", "ce", "td_nll", "kl_prior"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5, msg=name)
