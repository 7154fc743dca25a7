"""The composition root: what the plugin's hooks build from the validated `xkd:` block and hand to the trainer
(the reward head on the student, the teacher source, the loss settings, the on-policy sampler). Each piece lives
in its own module; this one only chooses and connects them.

Imports trainer-level code; the plugin imports it lazily.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import fields, replace

from torch import nn

from axolotl_xkd import __version__
from axolotl_xkd.args import XKDConfig
from axolotl_xkd.losses.reward_head import VariationalRewardHead
from axolotl_xkd.losses.xkd import XKDHyperparams
from axolotl_xkd.on_policy import OnPolicySampler
from axolotl_xkd.reward_store import ATTRIBUTE, HeadMetadata, save_beside_student
from axolotl_xkd.sequences import pad_token_id
from axolotl_xkd.teachers.base import TeacherSource
from axolotl_xkd.trainer import XKDSetup, base_model

LOG = logging.getLogger("axolotl_xkd")

def hyperparams(config: XKDConfig) -> XKDHyperparams:
    """The loss's plain hyperparameters from the validated config block: every XKDHyperparams field is read off
    the block by name (a field the block lacks raises here, instead of silently keeping the loss's default)."""
    return XKDHyperparams(**{f.name: getattr(config, f.name) for f in fields(XKDHyperparams) if f.name != "ignore_index"})


def find_reward_head(model: nn.Module) -> VariationalRewardHead | None:
    """The reward head attached to `model` (through any wrapper), if any."""
    return next((m for m in model.modules() if isinstance(m, VariationalRewardHead)), None)


def attach_reward_head(model: nn.Module, config: XKDConfig) -> VariationalRewardHead:
    """Add a trainable reward head as a submodule of the student, left out of the student's own saves.

    As a submodule it is moved, wrapped, all-reduced, optimised and checkpointed with the student by
    every launcher; `_keys_to_ignore_on_save` keeps it out of model.safetensors, so the saved student
    loads with plain transformers, and the trainer writes it beside the student instead.
    """
    base = base_model(model)
    hidden_size = base.config.get_text_config().hidden_size
    head = VariationalRewardHead(
        hidden_size,
        log_std_min=config.log_std_min,
        log_std_max=config.log_std_max,
        metadata=HeadMetadata(
            axolotl_xkd_version=__version__,
            reward_input=config.reward_input,
            q_form=config.q_form,
            temperature=config.temperature,
            gamma=config.gamma,
            base_model_type=base.config.model_type,
        ).as_dict(),
    )
    device = base.get_output_embeddings().weight.device
    base.add_module(ATTRIBUTE, head.to(device))
    head.requires_grad_(True)
    base._keys_to_ignore_on_save = set(base._keys_to_ignore_on_save or ()) | {
        f"{ATTRIBUTE}.{name}" for name in head.state_dict()
    }
    LOG.info("X-KD reward head attached: Linear(%d, 2) on the student's last hidden states", hidden_size)
    return head


def load_teacher(config: XKDConfig, trainer, student: nn.Module, *, sequence_len: int) -> TeacherSource | None:
    """The teacher source the loss needs (several teachers: their mixture), or None when no term reads the teacher.
    `sequence_len` is the config's, which a store among several teachers must have been written with."""
    if not config.teacher_blocks or not hyperparams(config).needs_teacher:
        return None
    teacher = config.teacher
    if teacher is not None and teacher.source == "precomputed":
        from axolotl_xkd.store.read import store_top_k
        from axolotl_xkd.teachers.precomputed import PrecomputedTeacherSource

        return PrecomputedTeacherSource(store_top_k(teacher))
    from axolotl_xkd.teachers.build import build_teacher

    student_model = base_model(student)
    options = {
        "student_tokenizer": trainer.processing_class,
        "dtype": student_model.dtype,
        "device": trainer.args.device,
        "attn_implementation": getattr(student_model.config, "_attn_implementation", None),
        "ds_config": trainer.accelerator.state.deepspeed_plugin.deepspeed_config if trainer.is_deepspeed_enabled
        else None,
    }
    if teacher is not None:
        return build_teacher(teacher, **options)
    from axolotl_xkd.teachers.mixture import Member, MixtureTeacherSource

    members = []
    for key, block in config.teacher_blocks:
        if block.source == "precomputed":
            from axolotl_xkd.teachers.recorded import RecordedTeacherSource

            source = RecordedTeacherSource.open(block, name=block.name, where=key, tokenizer=trainer.processing_class,
                                                sequence_len=sequence_len, sequences=config.sequences,
                                                partial=config.sequences == "teacher" and config.mixture == "route")
        else:
            source = build_teacher(block, **options)
        members.append(Member(block.name, source, block.weight))
        LOG.info("X-KD teacher %r: source %s, %s, %s, weight %g", block.name, block.source,
                 getattr(block, "base_url", None) or block.path,
                 "another tokenizer" if block.cross_tokenizer else "the student's tokenizer", block.weight)
    return MixtureTeacherSource(members, mixture=config.mixture, vocab_size=len(trainer.processing_class),
                                top_k=config.mixture_top_k, score=config.confidence_score,
                                temperature=config.confidence_temperature)


def teacher_tokenizer_key(teacher) -> str | None:
    """The key of an `xkd.teacher` block that names the tokenizer to check against the student's before any work
    (None: none here): an in-process teacher's always; with cross_tokenizer, a store's teacher (model_path) and a
    server's tokenizer_path. A same-tokenizer server is checked when the client connects, a store by its manifest."""
    if teacher is None:  # `teacher: null`: CE only (the quality study's sft arm)
        return None
    if teacher.source == "model":
        key = "tokenizer_path" if teacher.tokenizer_path else "path"
    elif teacher.cross_tokenizer:
        key = "model_path" if teacher.source == "precomputed" else "tokenizer_path"
    else:
        return None
    return key if getattr(teacher, key) is not None else None


def check_teacher_tokenizer(teacher, student_tokenizer: Callable[[], object], *, where: str = "xkd.teacher") -> None:
    """The teacher's tokenizer against the student's (`student_tokenizer` loads it, only when there is something to
    check), before the dataset is prepared and the student loads (tokenizers load in seconds, an 8B student in
    minutes): the same-tokenizer rule without cross_tokenizer; with it, that both can be read byte by byte."""
    key = teacher_tokenizer_key(teacher)
    if key is None:
        return
    from transformers import AutoTokenizer

    from axolotl_xkd.cross_tokenizer import KEY, check_readable
    from axolotl_xkd.frozen_teacher import check_same_tokenizer

    path = getattr(teacher, key)
    where = f"{where}.{key}={path!r}"
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=getattr(teacher, "trust_remote_code", False))
    student = student_tokenizer()
    if not teacher.cross_tokenizer:
        check_same_tokenizer(student, tokenizer, where)
        return
    check_readable(student, f"{where} with {KEY} (the student's tokenizer)")
    check_readable(tokenizer, f"{where} with {KEY} (the teacher's tokenizer)")


def configure_trainer(trainer, config: XKDConfig, cfg) -> None:
    """Load the teacher, find the reward head and hand both, with the loss settings, to the trainer."""
    student = trainer.accelerator.unwrap_model(trainer.model)
    tokenizer = trainer.processing_class
    vocab_size = len(tokenizer)
    rows = base_model(student).config.get_text_config().vocab_size
    if rows < vocab_size:
        raise ValueError(
            f"base_model: the student's output layer has {rows} rows but the tokenizer has {vocab_size} tokens; "
            "resize the student's embeddings (Axolotl: resize_token_embeddings_to_32x or added tokens)."
        )
    params = hyperparams(config)
    head = find_reward_head(student) if params.uses_reward else None
    if head is not None:
        head.metadata = replace(HeadMetadata.of(head.metadata), vocab_size=vocab_size,
                                eos_token_id=tokenizer.eos_token_id).as_dict()
    trainer.configure_xkd(XKDSetup(
        params,
        teacher=load_teacher(config, trainer, student, sequence_len=int(cfg.sequence_len)),
        reward_head=head,
        detach_backbone=config.reward_detach_backbone,
        eos_token_id=tokenizer.eos_token_id,
        vocab_size=vocab_size,
        chunk_size=config.chunk_size,
        sampler=on_policy_sampler(config, cfg, tokenizer),
        config_path=cfg.get("axolotl_config_path"),
    ))
    LOG.info("axolotl_xkd %s active: %s", __version__, config.model_dump_json(exclude_none=True))


def on_policy_sampler(config: XKDConfig, cfg, tokenizer) -> OnPolicySampler | None:
    """The sampler of `sequences: on_policy`, or None when every step trains on the dataset's sequences."""
    if config.sequences != "on_policy":
        return None
    pad_id = pad_token_id(tokenizer)
    return OnPolicySampler(config.generation, fraction=config.on_policy_fraction,
                           seed=int(cfg.seed or 0), pad_id=pad_id, eos_id=tokenizer.eos_token_id,
                           max_length=int(cfg.sequence_len))


def save_final_reward_head(model: nn.Module, cfg) -> None:
    """Write the trained head beside the final student in cfg.output_dir (rank 0 only), after Axolotl's final save.

    Axolotl saves a single-process or ZeRO-1/2 student with `model.save_pretrained`, which leaves the head out;
    under ZeRO-3 it calls the trainer's save_model, which already wrote the head from the gathered state, and
    this rank holds only shards (nothing to write). Axolotl 0.19 calls post_train twice (after trainer.train and
    again after saving the model): the head is written both times, the message logged once.
    """
    head = find_reward_head(model)
    if head is None or int(os.environ.get("RANK", "0")) != 0:
        return
    path = save_beside_student(head, cfg.output_dir)
    if path is not None and getattr(head, "_xkd_announced", None) != path:
        head._xkd_announced = path
        LOG.info("X-KD student saved to %s; reward head saved to %s", cfg.output_dir, path)
