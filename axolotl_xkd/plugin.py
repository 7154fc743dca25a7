"""XKDPlugin: the Axolotl hooks that switch X-KD on. Safe to import: heavy imports live inside hooks,
because Axolotl logs a plugin's ImportError and carries on without it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from axolotl.integrations.base import BasePlugin

if TYPE_CHECKING:
    from axolotl_xkd.args import XKDConfig

LOG = logging.getLogger("axolotl_xkd")


class XKDPlugin(BasePlugin):
    """Adds the `xkd:` config block, the X-KD trainer and the reward head to an Axolotl run."""

    def __init__(self) -> None:
        super().__init__()
        self._validated: tuple[dict, XKDConfig] | None = None
        self._entry_teachers: dict[str, list[str | None]] = {}  # each dataset entry's xkd_teacher, from the raw YAML

    def _xkd_config(self, cfg) -> XKDConfig | None:
        """The validated `xkd:` block, or None when the plugin is loaded but X-KD is off.

        Validated once per block (Axolotl hands every hook the same config), so its warnings show once.
        """
        from axolotl_xkd.args import XKDConfig

        block = cfg.get("xkd") if hasattr(cfg, "get") else None
        if block is None:
            return None
        if self._validated is None or self._validated[0] is not block:
            self._validated = (block, XKDConfig.model_validate(dict(block)))
        return self._validated[1]

    def get_input_args(self) -> str:
        return "axolotl_xkd.args.XKDArgs"

    def register(self, cfg) -> None:
        from axolotl_xkd.compat import warn_if_untested

        # Our loggers are not under "axolotl.", so give them Axolotl's level to show up beside its own.
        LOG.setLevel(logging.getLogger("axolotl").getEffectiveLevel())
        warn_if_untested()
        if cfg.get("xkd") is None:
            LOG.warning("axolotl_xkd.XKDPlugin is listed in plugins but the config has no `xkd:` block; X-KD is off")
        from axolotl_xkd.routing import check_entry_teachers, entry_teachers

        check_entry_teachers(cfg)
        self._entry_teachers = entry_teachers(cfg)  # Axolotl's validation drops the key from each entry

    def get_training_args(self, cfg) -> dict | None:
        """`use_cpu: True` for a bf16 run on a machine without an accelerator (Axolotl's `cfg.device` is "cpu"):
        transformers refuses `bf16` there unless `use_cpu` is set, and Axolotl has no key for it. The CPU runs bf16
        autocast as it does float32 training; DeepSpeed is left alone (`use_cpu` would switch it off)."""
        if cfg.get("xkd") is None or not (cfg.get("bf16") or cfg.get("bfloat16")) or cfg.get("device") != "cpu":
            return None
        if cfg.get("deepspeed"):
            return None
        LOG.info("X-KD: bf16 on a machine without an accelerator: training on the CPU (TrainingArguments.use_cpu)")
        return {"use_cpu": True}

    def pre_model_load(self, cfg) -> None:
        if cfg.get("xkd") is not None:
            from axolotl_xkd.distributed import cpu_ranks_before_model_load

            cpu_ranks_before_model_load(cfg)

    def post_model_load(self, cfg, model) -> None:
        config = self._xkd_config(cfg)
        if config is None or not (config.reward_kl_weight > 0 or config.td_weight > 0):
            return
        from axolotl_xkd.wiring import attach_reward_head

        attach_reward_head(model, config)

    def load_datasets(self, cfg, preprocess: bool = False):
        """The first hook of `axolotl train` and `preprocess` (0.19 and 0.21) after the config is validated, before
        the dataset is prepared and the model loaded: every teacher's places and tokenizer are checked here, then a
        precomputed store is read as the training data, or routed rows are prepared with their teacher."""
        config = self._xkd_config(cfg)
        if config is None:
            return None
        from axolotl_xkd.locations import check_data_files, check_teacher

        for key, block in config.teacher_blocks:
            check_teacher(block, training=not preprocess, where=key)
            if config.teachers is not None and block.source == "precomputed":
                from axolotl_xkd.teachers.recorded import check_store_name

                check_store_name(block.path, block.name, key)
        generated = config.teachers is not None and config.sequences == "teacher"  # the stores hold the rows
        precomputed = getattr(config.teacher, "source", None) == "precomputed"
        if not (precomputed or generated):  # else the stores are the training data
            check_data_files(cfg)
        if not preprocess:
            from functools import cache

            from axolotl.loaders import load_tokenizer

            from axolotl_xkd.wiring import check_teacher_tokenizer

            student_tokenizer = cache(lambda: load_tokenizer(cfg))
            for key, block in config.teacher_blocks:
                check_teacher_tokenizer(block, student_tokenizer, where=key)
        if generated:
            from axolotl_xkd.store.generated import load_generated_meta

            return load_generated_meta(cfg, config)
        if config.mixture == "route":
            from axolotl_xkd.routing import load_routed_datasets

            return load_routed_datasets(cfg, column=config.route_column, names=[t.name for t in config.teachers],
                                        default=config.default_teacher, entries=self._entry_teachers)
        if not precomputed:
            return None
        from axolotl_xkd.store.read import load_datasets_meta

        return load_datasets_meta(cfg, config.teacher, sequences=config.sequences)

    def get_collator_cls_and_kwargs(self, cfg, is_eval: bool = False):
        config = self._xkd_config(cfg)
        if config is None:
            return None
        from axolotl_xkd.store.collate import collator_for

        if config.mixture == "route":
            return collator_for(cfg, is_eval=is_eval)
        if getattr(config.teacher, "source", None) != "precomputed":
            return None
        from axolotl_xkd.store.read import store_top_k

        return collator_for(cfg, is_eval=is_eval, top_k=store_top_k(config.teacher))

    def get_trainer_cls(self, cfg):
        if cfg.get("xkd") is None:
            return None
        from axolotl_xkd.trainer import XKDTrainer

        return XKDTrainer

    def post_trainer_create(self, cfg, trainer) -> None:
        config = self._xkd_config(cfg)
        if config is None:
            return
        from axolotl_xkd.distributed import cpu_ranks_after_trainer_create
        from axolotl_xkd.wiring import configure_trainer

        cpu_ranks_after_trainer_create(trainer.accelerator)
        configure_trainer(trainer, config, cfg)

    def post_train(self, cfg, model) -> None:
        if cfg.get("xkd") is None:
            return
        from axolotl_xkd.compat import merge_hook_available, merge_instructions
        from axolotl_xkd.interrupt import MARKER, clear_interrupted
        from axolotl_xkd.wiring import find_reward_head, save_final_reward_head

        save_final_reward_head(model, cfg)
        if clear_interrupted(cfg.output_dir):
            LOG.info("X-KD: this run finished; removed %s, left by an interrupted run into %s", MARKER, cfg.output_dir)
        if cfg.get("adapter") and find_reward_head(model) is not None and not merge_hook_available():
            LOG.info(merge_instructions(cfg.output_dir))

    def post_lora_merge(self, cfg, adapter_path: str, output_path: str) -> None:
        """Axolotl >= 0.21, after `axolotl merge-lora`: put the reward head beside the merged student."""
        if cfg.get("xkd") is None:
            return
        from axolotl_xkd.compat import copy_reward_head

        copied = copy_reward_head(adapter_path, output_path)
        if copied:
            LOG.info("X-KD reward head copied into the merged model folder %s", output_path)
        else:
            LOG.warning("X-KD: %s holds no reward head to copy into %s", adapter_path, output_path)


# The spellings of XKDPlugin in `plugins:` (Axolotl 0.21 also accepts `module:Class`).
PLUGIN_NAMES = ("axolotl_xkd.XKDPlugin", "axolotl_xkd.plugin.XKDPlugin")


class XKDBlockCheck(BasePlugin):
    """Warns when a config has an `xkd:` block but does not list XKDPlugin: Axolotl then drops the block silently
    and trains plain SFT. Axolotl >= 0.21 loads every installed `axolotl.plugins` entry point (pyproject.toml names
    this class) without a `plugins:` line and hands its `register` the raw config; 0.19 loads listed plugins only,
    so there nothing of this package runs and only the missing `axolotl_xkd <version> active:` line tells."""

    def register(self, cfg) -> None:
        listed = {str(name).replace(":", ".") for name in cfg.get("plugins") or ()}
        if cfg.get("xkd") is not None and not listed & set(PLUGIN_NAMES):
            LOG.warning(
                "the config has an `xkd:` block but its `plugins:` list lacks axolotl_xkd.XKDPlugin, so Axolotl "
                "ignores the block and this run trains without X-KD; add `plugins: [axolotl_xkd.XKDPlugin]`."
            )
