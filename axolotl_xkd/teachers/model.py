"""The in-process teacher (`xkd.teacher.source: model`): a causal LM run without gradients.

Imports transformers; knows nothing of Axolotl or the trainer.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from axolotl_xkd.distributed import full_shape, gathered, place_teacher
from axolotl_xkd.losses.signal import DenseHiddenSignal, DenseSignal

LOG = logging.getLogger(__name__)

_SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "unk_token_id")


def check_same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, where: str) -> None:
    """Raise unless both tokenizers map every token (special and added ones included) to the same id.

    X-KD compares next-token distributions id by id, so any difference would pair unrelated tokens.
    """
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if len(student) != len(teacher) or s_vocab != t_vocab:
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        moved = sorted(k for k in set(s_vocab) & set(t_vocab) if s_vocab[k] != t_vocab[k])[:5]
        raise ValueError(
            f"{where}: the teacher's tokenizer ({len(teacher)} tokens) differs from the student's "
            f"({len(student)} tokens); only in the student: {only_s}, only in the teacher: {only_t}, "
            f"different ids: {moved}. X-KD compares next-token distributions id by id, so both must use "
            "the same tokenizer. Point xkd.teacher.tokenizer_path / the student's tokenizer_config at the "
            "same tokenizer, or distil from a precomputed top-k dataset made with the student's tokenizer."
        )
    for name in _SPECIAL_TOKENS:
        s_id, t_id = getattr(student, name), getattr(teacher, name)
        if s_id != t_id:
            # Same vocabulary, another designation (Axolotl's `special_tokens:` may re-designate EOS for
            # the student): distributions still compare id by id, and terminals use the student's EOS.
            LOG.warning(
                "%s: %s is %s for the student but %s for the teacher; X-KD uses the student's", where, name, s_id, t_id
            )


def output_layer_is_linear(model: nn.Module) -> bool:
    """True when `model`'s logits are its decoder's last hidden state times a plain Linear output layer.

    Softcapped (Gemma 2), scaled (Cohere) or adapter-wrapped output layers are not, and keep full logits.
    """
    config = model.config.get_text_config()
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    return type(model.get_output_embeddings()) is nn.Linear and hasattr(model, "get_decoder")


class ModelTeacherSource:
    """Runs a frozen teacher on the student's batch and returns its logits over the shared vocabulary."""

    def __init__(self, model: nn.Module, vocab_size: int, engine: nn.Module | None = None) -> None:
        self.model = model
        self.vocab_size = vocab_size
        # Under ZeRO-3, the DeepSpeed inference engine whose hooks (installed on `model` itself) gather
        # the sharded parameters in every forward; kept alive here.
        self.engine = engine

    @classmethod
    def load(
        cls,
        path: str,
        *,
        student_tokenizer: PreTrainedTokenizerBase,
        dtype: torch.dtype,
        device: torch.device,
        tokenizer_path: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        ds_config: dict | None = None,
        offload: bool = False,
    ) -> ModelTeacherSource:
        """Load the teacher once, check its tokenizer and output size, freeze it and place it on this rank.

        `ds_config` is the student's DeepSpeed config (None without DeepSpeed): under ZeRO-3 the teacher
        is sharded across ranks (its shards kept in CPU memory with `offload`) and gathered layer by layer
        by the hooks of a DeepSpeed inference engine; otherwise it is moved whole to `device`
        (distributed.place_teacher).
        """
        teacher_tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_path or path, trust_remote_code=trust_remote_code
        )
        check_same_tokenizer(student_tokenizer, teacher_tokenizer, f"xkd.teacher.path={path!r}")
        kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        vocab_size = len(student_tokenizer)
        rows = full_shape(model.get_output_embeddings().weight)[0]
        if rows < vocab_size:
            raise ValueError(
                f"xkd.teacher.path={path!r}: the teacher's output layer has {rows} rows but the tokenizer has "
                f"{vocab_size} tokens; the teacher cannot score every token."
            )
        model.requires_grad_(False)
        model.eval()
        placed = place_teacher(model, device=device, ds_config=ds_config, offload=offload)
        engine = None if placed is model else placed
        where = device if engine is None else "ZeRO-3 sharded" + (", offloaded to CPU" if offload else "")
        LOG.info("X-KD teacher %s loaded (%s, %s, output rows %d)", path, dtype, where, rows)
        return cls(model, vocab_size, engine)

    @property
    def fusable(self) -> bool:
        """Whether the chunked loss may form the teacher's logits itself: a plain Linear output layer."""
        return output_layer_is_linear(self.model)

    @torch.no_grad()
    def get_hidden_signal(self, batch: dict[str, Tensor]) -> DenseHiddenSignal:
        """Teacher last hidden states and output layer: the chunked loss forms its logits per chunk."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        hidden = self.model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        head = self.model.get_output_embeddings()
        if self.engine is None:
            return DenseHiddenSignal(hidden=hidden, weight=head.weight, bias=head.bias)
        # ZeRO-3: the head's shards are gathered into one whole copy per batch (its own forward would gather
        # it once too); the chunked loss reads it chunk by chunk, so no (N, V) teacher logits are formed.
        with gathered([head.weight, head.bias]):
            weight = head.weight.detach().clone()
            bias = None if head.bias is None else head.bias.detach().clone()
        return DenseHiddenSignal(hidden=hidden, weight=weight, bias=bias)

    @torch.no_grad()
    def get_signal(self, batch: dict[str, Tensor]) -> DenseSignal:
        """Teacher logits (B, T, V_tok) for the batch; padded embedding rows beyond the tokenizer are cut."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = self.model(**inputs, use_cache=False).logits
        return DenseSignal(logits=logits[..., : self.vocab_size])
