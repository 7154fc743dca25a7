"""The in-process teacher (`xkd.teacher.source: model`): a causal LM run without gradients.

Loading and the same-tokenizer rule live in `frozen_teacher`; this adapter places the teacher (DeepSpeed) and
turns batches into signals. Imports torch; knows nothing of Axolotl or the trainer.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from axolotl_xkd.distributed import full_shape, gathered, place_teacher
from axolotl_xkd.frozen_teacher import load_frozen_teacher, output_layer_is_linear
from axolotl_xkd.losses.signal import DenseHiddenSignal, DenseSignal
from axolotl_xkd.teachers.base import TeacherSource

LOG = logging.getLogger(__name__)


class ModelTeacherSource(TeacherSource):
    """Runs a frozen teacher on the student's batch and returns its logits over the shared vocabulary."""

    def __init__(self, model: nn.Module, vocab_size: int, engine: nn.Module | None = None) -> None:
        self.model = model
        self.vocab_size = vocab_size
        # Under ZeRO-3, the DeepSpeed inference engine whose hooks (installed on `model` itself) gather
        # the sharded parameters in every forward; kept alive here.
        self.engine = engine

    @classmethod
    def load(cls, path: str, *, student_tokenizer, **kwargs) -> ModelTeacherSource:
        """Load the teacher once, check its tokenizer and output size, freeze it and place it on this rank
        (`load_placed`)."""
        model, _, engine = load_placed(path, student_tokenizer=student_tokenizer, **kwargs)
        return cls(model, len(student_tokenizer), engine)

    @property
    def fusable(self) -> bool:
        """Whether the chunked loss may form the teacher's logits itself: a plain Linear output layer."""
        return output_layer_is_linear(self.model)

    @torch.no_grad()
    def get_hidden_signal(self, batch: dict[str, Tensor]) -> DenseHiddenSignal:
        """Teacher last hidden states and output layer: the chunked loss forms its logits per chunk."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        return hidden_signal(self.model, self.engine, inputs)

    @torch.no_grad()
    def get_signal(self, batch: dict[str, Tensor]) -> DenseSignal:
        """Teacher logits (B, T, V_tok) for the batch; padded embedding rows beyond the tokenizer are cut."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = self.model(**inputs, use_cache=False).logits
        return DenseSignal(logits=logits[..., : self.vocab_size])


@torch.no_grad()
def hidden_signal(model: nn.Module, engine: nn.Module | None, inputs: dict[str, Tensor]) -> DenseHiddenSignal:
    """The teacher's last hidden states on `inputs` and its output layer (a plain Linear: `output_layer_is_linear`),
    so that a loss or a projection forms its logits a block of positions at a time."""
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    if engine is None:
        return DenseHiddenSignal(hidden=hidden, weight=head.weight, bias=head.bias)
    # ZeRO-3: the head's shards are gathered into one whole copy per batch (its own forward would gather it once
    # too); the consumer reads it block by block, so no (N, V) teacher logits are formed.
    with gathered([head.weight, head.bias]):
        weight = head.weight.detach().clone()
        bias = None if head.bias is None else head.bias.detach().clone()
    return DenseHiddenSignal(hidden=hidden, weight=weight, bias=bias)


def load_placed(
    path: str,
    *,
    student_tokenizer,
    dtype: torch.dtype,
    device: torch.device,
    tokenizer_path: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    ds_config: dict | None = None,
    offload: bool = False,
    cross_tokenizer: bool = False,
) -> tuple[nn.Module, object, nn.Module | None]:
    """(model, tokenizer, engine): the frozen teacher (frozen_teacher.load_frozen_teacher) placed on this rank.

    `ds_config` is the student's DeepSpeed config (None without DeepSpeed): under ZeRO-3 the teacher
    is sharded across ranks (its shards kept in CPU memory with `offload`) and gathered layer by layer
    by the hooks of a DeepSpeed inference engine (returned as `engine`, else None); otherwise it is moved whole
    to `device` (distributed.place_teacher). `cross_tokenizer` lifts the same-tokenizer rule.
    """
    model, tokenizer = load_frozen_teacher(
        path, dtype=dtype, student_tokenizer=student_tokenizer, tokenizer_path=tokenizer_path,
        attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
        where=f"xkd.teacher.path={path!r}", cross_tokenizer=cross_tokenizer,
    )
    placed = place_teacher(model, device=device, ds_config=ds_config, offload=offload)
    engine = None if placed is model else placed
    where = device if engine is None else "ZeRO-3 sharded" + (", offloaded to CPU" if offload else "")
    rows = full_shape(model.get_output_embeddings().weight)[0]
    LOG.info("X-KD teacher %s loaded (%s, %s, output rows %d)", path, dtype, where, rows)
    return model, tokenizer, engine
