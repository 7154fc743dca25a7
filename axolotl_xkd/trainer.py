"""XKDTrainer: Axolotl's trainer with the X-KD loss, its metrics, and the reward head's save/resume.

Above the losses and teacher sources; knows nothing of the plugin or the config schema: the plugin
hands it an `XKDSetup` (plain hyperparameters, a teacher source, the reward head) in `configure_xkd`.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass

import torch
from axolotl.core.trainers.base import AxolotlTrainer
from torch import Tensor, nn
from transformers import Trainer

from axolotl_xkd.compat import count_trained_tokens
from axolotl_xkd.distributed import gathered, through_output_layer
from axolotl_xkd.frozen_teacher import output_layer_is_linear
from axolotl_xkd.interrupt import EXIT_STATUS, SigintSeen, interrupted_notice, mark_interrupted
from axolotl_xkd.keys import is_xkd_key
from axolotl_xkd.losses.chunked import chunked_xkd_loss
from axolotl_xkd.losses.reward_head import VariationalRewardHead
from axolotl_xkd.losses.xkd import XKDHyperparams, XKDLossOutput, xkd_loss
from axolotl_xkd.on_policy import OnPolicySampler
from axolotl_xkd.options import DEFAULT_CHUNK_SIZE, reward_reaches_student
from axolotl_xkd.reward_store import WEIGHTS_NAME, load_reward_head, save_beside_student
from axolotl_xkd.server.client import TeacherServerError
from axolotl_xkd.teachers.base import TeacherSource
from axolotl_xkd.time_shares import TimeShares

LOG = logging.getLogger(__name__)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# Logged per response token, under xkd/<name> (train) and eval_xkd/<name> (eval): metric name -> the
# XKDLossOutput field summed for it.
METRIC_FIELDS = {"distill": "divergence", "ce": "ce", "reward_kl": "kl_prior", "td_nll": "td_nll",
                 "reward_mu": "mu_sum", "reward_sigma": "sigma_sum"}
METRICS = tuple(METRIC_FIELDS)
# The parts of a training step logged as xkd/<part>_time_share: the teacher's signal, on-policy generation, the loss
# (its forward, which in the chunked loss also forms the output layer's gradients).
STEP_PARTS = ("teacher", "rollout", "loss")


@dataclass(frozen=True)
class XKDSetup:
    """What the trainer needs besides Axolotl's own arguments; built once by `wiring.configure_trainer`."""

    params: XKDHyperparams
    teacher: TeacherSource | None
    reward_head: VariationalRewardHead | None
    detach_backbone: bool  # the reward head reads detached hidden states
    eos_token_id: int | None
    vocab_size: int  # the tokenizer's; logits beyond it are padding rows
    chunk_size: int = DEFAULT_CHUNK_SIZE  # 0: unchunked loss over full logits
    sampler: OnPolicySampler | None = None  # on-policy steps (sequences: on_policy)
    config_path: str | None = None  # the run's YAML, named in the resume command an interrupt logs

    @property
    def head_apart(self) -> bool:
        """Whether the reward terms train the reward head only: the student's objective is then
        alpha_kd * D + alpha_ce * CE, the loss GKD with the same settings has."""
        return not reward_reaches_student(td_target=self.params.td_target, detach_backbone=self.detach_backbone)

    @property
    def ce_metric(self) -> str | None:
        """The logged metric (under xkd/) that is the per-token cross-entropy with the data, if the loss computes
        one: `ce` with alpha_ce > 0, else `distill` for SeqKD (-log pi(a_i | s_i)) at temperature 1."""
        if self.params.alpha_ce > 0:
            return "ce"
        if self.params.alpha_kd > 0 and self.params.divergence == "sequence" and self.params.temperature == 1.0:
            return "distill"
        return None


class _ShownAs(torch.autograd.Function):
    """The value of `shown` with the gradient of `loss`: what the Trainer logs as `loss`, while it differentiates
    the whole objective (the reward head's terms included) exactly as before."""

    @staticmethod
    def forward(ctx, loss: Tensor, shown: Tensor) -> Tensor:
        return shown.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _CrossEntropyPerplexity(Trainer):
    """Axolotl's `log` adds ppl = exp(loss) (0.19 always, 0.21 unless `reports_token_perplexity` is off), but the
    X-KD loss is a divergence, not a cross-entropy. This class comes after AxolotlTrainer in XKDTrainer's bases, so
    its `log` runs after Axolotl's and before transformers' records and reports the entry: there ppl (eval_ppl)
    becomes exp of the logged cross-entropy where the loss computes one (`XKDSetup.ce_metric`), and is dropped
    elsewhere."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        ce_metric = None if self.xkd is None else self.xkd.ce_metric
        for ppl, prefix in (("ppl", "xkd/"), ("eval_ppl", "eval_xkd/")):
            logs.pop(ppl, None)
            if ce_metric is not None and prefix + ce_metric in logs:
                try:
                    logs[ppl] = round(math.exp(logs[prefix + ce_metric]), 5)
                except OverflowError:
                    logs[ppl] = float("inf")
        super().log(logs, start_time)


class XKDTrainer(AxolotlTrainer, _CrossEntropyPerplexity):
    """Computes the X-KD loss normalised per response token over the whole optimizer step.

    Logged as `loss`: with the reward head apart from the student (`XKDSetup.head_apart`, the defaults) the student's
    own objective, alpha_kd * D + alpha_ce * CE, the number a GKD run with the same settings logs; otherwise the
    whole objective.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.xkd: XKDSetup | None = None
        self._xkd_head_state: dict[str, Tensor] | None = None
        self._xkd_sums: dict[str, dict[str, Tensor]] = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._xkd_time = TimeShares()
        # The loss divides by num_items_in_batch itself, so the Trainer must count it and not
        # divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True

    def configure_xkd(self, setup: XKDSetup) -> None:
        """Install the loss settings; called once by the plugin after the trainer is built."""
        self.xkd = setup

    def train(self, *args, **kwargs):
        """Axolotl's training loop; when the teacher server fails beyond its retries, the steps trained so far are
        saved as a checkpoint before the error stops the run (nothing trained is lost). On Ctrl-C, after Axolotl's
        handler saved the student, the reward head and a marker go beside it and the exit status is 130
        (interrupt.py)."""
        sigint = SigintSeen()
        try:
            with sigint:
                return super().train(*args, **kwargs)
        except TeacherServerError as error:
            error.add_note(self._save_before_stopping())
            raise
        except SystemExit:  # Axolotl's SIGINT handler saves the student and exits with 0
            if not sigint.seen:
                raise
            if self.args.should_save:
                self._record_interrupt()
            raise SystemExit(EXIT_STATUS) from None

    def _record_interrupt(self) -> None:
        """Write the reward head beside the student Axolotl saved on the interrupt, and the marker; log both and the
        command that resumes."""
        out = self.args.output_dir
        saved = [f"the student of step {self.state.global_step} (Axolotl's save on an interrupt)"]
        if self._xkd_head is not None:
            path = save_beside_student(self._xkd_head, out)
            saved.append(f"its reward head ({path.name})" if path is not None else
                         "not its reward head: it is partitioned across ranks (the checkpoints hold it)")
        notice = interrupted_notice(out, step=self.state.global_step, max_steps=self.state.max_steps, saved=saved,
                                    config_path=self.xkd.config_path if self.xkd is not None else None)
        mark_interrupted(out, notice)
        LOG.warning(notice)

    def _save_before_stopping(self) -> str:
        """Save checkpoint-<steps done> (the weights, optimizer, scheduler, RNG and log of the last completed
        optimizer step; a step cut short by the failure was not applied) and say how to resume from it."""
        step = self.state.global_step
        folder = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        if step == 0:
            return "No optimizer step was completed, so nothing was trained: start the run again."
        if self.accelerator.num_processes > 1:
            # A save is a collective; the other ranks may be waiting elsewhere for the failed one.
            return (f"With {self.accelerator.num_processes} processes no checkpoint is saved on a failure: resume "
                    "from the newest periodic checkpoint (save_steps) in the output_dir.")
        if not os.path.isdir(folder):
            self._save_checkpoint(self.model_wrapped, trial=None)
        LOG.error("X-KD: the teacher server failed at step %d; the %d completed steps are in %s", step + 1, step,
                  folder)
        return (f"The {step} completed optimizer steps are saved in {folder}: once the server answers again, set "
                f"resume_from_checkpoint: {folder} (or auto_resume_from_checkpoints: true) and run axolotl train.")

    def _clip_grad_norm(self, model: nn.Module):
        """With a detached reward head, clip the student's gradient and the head's each by its own norm, so that
        the student's update is exactly the one it would get without the head (its steps are GKD's with the
        defaults). DeepSpeed and FSDP clip inside their own step over every parameter: there the two share one
        norm. Returns the student's pre-clip norm (the logged grad_norm)."""
        head = self._xkd_head
        if (head is None or not self.xkd.detach_backbone or not self.args.max_grad_norm
                or self.is_deepspeed_enabled or self.is_fsdp_enabled):
            return super()._clip_grad_norm(model)
        apart = {id(p) for p in head.parameters()}
        student = [p for p in model.parameters() if id(p) not in apart]
        norm = self.accelerator.clip_grad_norm_(student, self.args.max_grad_norm)  # unscales every gradient
        torch.nn.utils.clip_grad_norm_(list(head.parameters()), self.args.max_grad_norm)
        return norm

    @property
    def _xkd_head(self) -> VariationalRewardHead | None:
        """The reward head being trained, if any (none before configure_xkd)."""
        return None if self.xkd is None else self.xkd.reward_head

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the precomputed teacher's dataset columns, which are not arguments of the model's forward."""
        super()._set_signature_columns_if_needed()
        columns = self.train_dataset.column_names if hasattr(self.train_dataset, "column_names") else []
        keep = self._signature_columns
        keep += [c for c in columns or [] if is_xkd_key(c) and c not in keep]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """A step's batches: through the teacher's lookahead (a server teacher sends requests ahead), or, with
        on-policy steps, drawn now, replaced by the student's samples on an on-policy step, then sent to the teacher.
        """
        teacher = None if self.xkd is None else self.xkd.teacher
        self._xkd_time.open()
        if self.xkd is None or self.xkd.sampler is None:
            if teacher is not None:
                epoch_iterator = teacher.prefetched(epoch_iterator)
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = list(itertools.islice(epoch_iterator, num_batches))
        if batches and self.xkd.sampler.is_on_policy(self.state.global_step):
            from trl.models.utils import unwrap_model_for_generation

            # Under ZeRO-3 the student's parameters are gathered once for the whole generation.
            with (self._xkd_time.timed("rollout", self.args.device),
                  unwrap_model_for_generation(self.model_wrapped, self.accelerator) as student):
                batches = self.xkd.sampler.sample(student, batches, self.state.global_step)
        for batch in batches if teacher is not None else ():
            teacher.submit(batch)
        return batches, self._get_num_items_in_batch(batches, device)

    def _forward_with_hidden(self, model: nn.Module, inputs: dict[str, Tensor], *, fused: bool):
        """Student forward; also returns the last hidden states (the input of the output layer).

        fused: read them off the decoder and let the model form logits for the last position only, since
        the chunked loss forms the rest chunk by chunk; else hook the output layer's input.
        """
        student = base_model(self.accelerator.unwrap_model(model))
        captured: dict[str, Tensor] = {}
        if fused:
            handle = student.get_decoder().register_forward_hook(
                lambda _m, _a, out: captured.__setitem__("h", out[0])
            )
            kwargs = {"logits_to_keep": 1}
        else:
            handle = student.get_output_embeddings().register_forward_hook(
                lambda _m, args, _o: captured.__setitem__("h", args[0])
            )
            kwargs = {}
        try:
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False, **kwargs)
        finally:
            handle.remove()
        return outputs, captured["h"]

    def _uses_fused_loss(self, model: nn.Module) -> bool:
        """The chunked loss is the default (also under ZeRO-3, see `through_output_layer`); full logits
        are kept for output layers it cannot fuse."""
        student = base_model(self.accelerator.unwrap_model(model))
        return self.xkd.chunk_size > 0 and output_layer_is_linear(student)

    def _teacher_signal(self, inputs: dict[str, Tensor], *, fused: bool):
        if not self.xkd.params.needs_teacher:
            return None
        with self._xkd_time.timed("teacher", self.args.device):
            if fused and self.xkd.teacher.fusable:
                return self.xkd.teacher.get_hidden_signal(inputs)
            return self.xkd.teacher.get_signal(inputs)

    def _count_tokens(self, model: nn.Module, inputs: dict[str, Tensor]) -> None:
        """Axolotl's throughput counters, as its own compute_loss keeps them (which this trainer's does not call):
        the batch the step trains on, so an on-policy step counts the student's samples."""
        if self.args.include_tkps and model.training:
            count_trained_tokens(self, inputs)

    def _loss_output(self, model: nn.Module, inputs: dict[str, Tensor], outputs, hidden: Tensor, common: dict, *,
                     fused: bool) -> XKDLossOutput:
        """The X-KD loss of the micro-batch: chunked and fused with the output layer, or over the full logits."""
        with self._xkd_time.timed("loss", self.args.device):
            if fused:
                return through_output_layer(
                    model,
                    lambda weight, bias, h: chunked_xkd_loss(h, weight, inputs["labels"], output_bias=bias,
                                                             vocab_size=self.xkd.vocab_size,
                                                             chunk_size=self.xkd.chunk_size, **common),
                    hidden,
                )
            logits = outputs.logits
            if logits.shape[-1] != self.xkd.vocab_size:
                logits = logits[..., : self.xkd.vocab_size]
            return xkd_loss(logits, inputs["labels"], **common)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.xkd is None:
            raise RuntimeError("XKDTrainer.configure_xkd was not called; use it through axolotl_xkd.XKDPlugin")
        params = self.xkd.params
        self._count_tokens(model, inputs)
        fused = self._uses_fused_loss(model)
        outputs, hidden = self._forward_with_hidden(model, inputs, fused=fused)
        teacher = self._teacher_signal(inputs, fused=fused)
        mean = log_std = None
        if params.uses_reward:
            mean, log_std = self.xkd.reward_head(hidden.detach() if self.xkd.detach_backbone else hidden)
        common = {
            "teacher": teacher,
            "mu": mean,
            "log_sigma": log_std,
            "params": params,
            "position_ids": inputs.get("position_ids"),
            "eos_token_id": self.xkd.eos_token_id,
            "forces": self._forces_due(model),
        }
        out = self._loss_output(model, inputs, outputs, hidden, common, fused=fused)
        self._accumulate(out, "train" if model.training else "eval")
        total = out.loss
        if self.xkd.head_apart:
            # The head's terms do not reach the student: `loss` shows the student's objective (they are under xkd/).
            total = _ShownAs.apply(out.loss, params.alpha_kd * out.divergence + params.alpha_ce * out.ce)
        if num_items_in_batch is None:
            loss = total / out.num_tokens.clamp(min=1)
        else:
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                # Data-parallel gradients are averaged over ranks; the divisor already counts every rank.
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _forces_due(self, model: nn.Module) -> bool:
        """Whether this micro-batch measures the terms' pulls on the logits (xkd/kd_force, xkd/td_force): in training
        steps that end in a log, when the TD term pulls on the student's Q (a coupled, unfixed TD target)."""
        p = self.xkd.params
        if not (model.training and p.uses_td and not p.fixed_td_target) or self.args.logging_steps <= 0:
            return False
        return (self.state.global_step + 1) % int(self.args.logging_steps) == 0

    def _accumulate(self, out: XKDLossOutput, mode: str) -> None:
        sums = self._xkd_sums[mode]
        sums["tokens"] = sums["tokens"] + out.num_tokens.detach().float()
        for name, output_field in METRIC_FIELDS.items():
            sums[name] = sums[name] + getattr(out, output_field).detach().float()
        if out.forces is not None:
            sums["forces"] = sums["forces"] + out.forces.detach().float()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval"
        sums = self._xkd_sums[mode]
        if sums:
            forces = sums.pop("forces", None)
            stacked = torch.stack([torch.as_tensor(sums[k], device=self.args.device) for k in ("tokens", *METRICS)])
            totals = dict(zip(("tokens", *METRICS), self.accelerator.reduce(stacked, reduction="sum").tolist()))
            tokens = max(totals.pop("tokens"), 1.0)
            prefix = "xkd/" if mode == "train" else "eval_xkd/"
            logs.update({prefix + name: round(total / tokens, 6) for name, total in totals.items()})
            if forces is not None:  # the same micro-batches ask for them on every rank
                kd, td, rows = self.accelerator.reduce(forces.to(self.args.device), reduction="sum").tolist()
                rows = max(rows, 1.0)
                logs.update({"xkd/kd_force": round(kd / rows, 6), "xkd/td_force": round(td / rows, 6)})
            self._xkd_sums[mode] = defaultdict(float)
        if mode == "train":
            logs.update(self._xkd_step_logs())
        elif self.xkd is not None and self.xkd.teacher is not None:  # the evaluation's batches, not the next step's
            logs.update({f"eval_xkd/{k}": round(v, 6) for k, v in self.xkd.teacher.metrics().items()})
        super().log(logs, start_time)

    def _xkd_step_logs(self) -> dict[str, float]:
        """The on-policy statistics, the teacher's (a mixture's per-teacher shares) and the step's time shares since
        the last log, under xkd/."""
        logs = self._xkd_time.shares(STEP_PARTS)
        if self.xkd is not None and self.xkd.sampler is not None:
            logs.update(self.xkd.sampler.metrics())
        if self.xkd is not None and self.xkd.teacher is not None:
            logs.update(self.xkd.teacher.metrics())
        return {f"xkd/{k}": round(v, 6) for k, v in logs.items()}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Every rank comes here; under ZeRO-3 the head is gathered (a collective) and copied now, so that
        # _save, which runs on the main process only, writes the whole head.
        if self._xkd_head is not None:
            with gathered(list(self._xkd_head.parameters())):
                self._xkd_head_state = {k: v.detach().to("cpu", copy=True) for k, v in
                                        self._xkd_head.state_dict().items()}
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self._xkd_head is None:
            return
        path = save_beside_student(self._xkd_head, output_dir or self.args.output_dir, state=self._xkd_head_state)
        if path is not None:
            LOG.info("X-KD reward head saved to %s", path)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self._xkd_head is None or self.is_deepspeed_enabled:
            return  # DeepSpeed restores the head with the rest of its module state.
        if not os.path.isfile(os.path.join(resume_from_checkpoint, WEIGHTS_NAME)):
            raise FileNotFoundError(
                f"resume_from_checkpoint={resume_from_checkpoint!r} has no {WEIGHTS_NAME}: it was not written by an "
                "X-KD run with a reward head, so the head cannot be restored. Start a fresh run instead."
            )
        saved, _ = load_reward_head(resume_from_checkpoint)
        with torch.no_grad():
            for name, tensor in saved.state_dict().items():
                self._xkd_head.get_parameter(name).copy_(tensor)
        LOG.info("X-KD reward head restored from %s", resume_from_checkpoint)
