"""`axolotl xkd precompute CONFIG.yml`: store the teacher's top-k log-probs for the config's data once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import click
import yaml
from pydantic import Field, TypeAdapter, ValidationError

from axolotl_xkd.args import ModelTeacher, PrecomputedTeacher, ServerTeacher, XKDConfig, check_base_url
from axolotl_xkd.cli import checked
from axolotl_xkd.locations import check_model_location

Teacher = ModelTeacher | PrecomputedTeacher | ServerTeacher
# Validates `xkd.teacher` alone, as XKDConfig does, without the block-level checks (and their warnings).
_TEACHER = TypeAdapter(Annotated[Teacher, Field(discriminator="source")])


@click.command("precompute")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="Teacher entries kept per position (default: xkd.teacher.cross_tokenizer_top_k across tokenizers, "
              "else xkd.teacher.top_k, else 64).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: xkd.teacher.path when the block is `source: precomputed`).")
@click.option("--teacher", "teacher_path", default=None,
              help="Teacher model (default: xkd.teacher.path for source: model, model_path for precomputed).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Rows per forward.")
@click.option("--rows-per-shard", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Rows per shard; a finished shard is never recomputed.")
@click.option("--logprob-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--generate", is_flag=True,
              help="Store the teacher's own responses to the rows' prompts (sampled with xkd.generation); "
              "implied by xkd.sequences: teacher.")
@click.option("--seed", type=int, default=None,
              help="Seed of --generate's sampling (default: the config's seed, else 0).")
@click.option("--server", default=None,
              help="Ask a running teacher server at this URL (vLLM `vllm serve MODEL`, or `axolotl xkd "
              "serve-teacher`) instead of loading the teacher here; default: xkd.teacher.base_url when the "
              "config's teacher is `source: server`.")
@click.option("--server-model", default=None, help="Served model name (default: the first one the server lists).")
@click.option("--cross-tokenizer", is_flag=True,
              help="The teacher has another tokenizer: store its distributions aligned to the student's positions "
              "(docs/cross_tokenizer.md); read from xkd.teacher.cross_tokenizer: true (any teacher block), so the "
              "flag is only needed for a teacher given with --teacher.")
@click.option("--name", default=None,
              help="With xkd.teachers: the `source: precomputed` teacher whose store to write (default: each of them, "
              "one after another); its name is recorded in the store, which training checks.")
def precompute(config: str, top_k: int | None, out: str | None, teacher_path: str | None, batch_size: int,
               rows_per_shard: int, logprob_dtype: str, generate: bool, seed: int | None, server: str | None,
               server_model: str | None, cross_tokenizer: bool, name: str | None) -> None:
    """Run the teacher of CONFIG.yml over its tokenized rows and write top-k log-probs (resumable); with
    xkd.teachers, one store per `source: precomputed` teacher."""
    named = _named_stores(config, name)
    if named and (out or teacher_path or server):
        raise click.UsageError("--out, --teacher and --server name one teacher's store; with xkd.teachers each store "
                               "is its item's path and model_path: select one with --name")
    runs = _planned(config, named, generate) if named else [(None, _teacher_block(config), {})]
    for teacher_name, teacher, plan in runs:
        _precompute(config, teacher, teacher_name, top_k=top_k, out=out, teacher_path=teacher_path,
                    batch_size=batch_size, rows_per_shard=rows_per_shard, logprob_dtype=logprob_dtype,
                    generate=generate, seed=seed, server=server, server_model=server_model,
                    cross_tokenizer=cross_tokenizer, plan=plan)


def _precompute(config: str, teacher: Teacher | None, teacher_name: str | None, *, top_k: int | None, out: str | None,
                teacher_path: str | None, batch_size: int, rows_per_shard: int, logprob_dtype: str, generate: bool,
                seed: int | None, server: str | None, server_model: str | None, cross_tokenizer: bool,
                plan: dict) -> None:
    """One store: of the config's `teacher` block (or of the named item `teacher_name` of xkd.teachers, written as
    `plan`, the PrecomputeSettings fields of store.generated.StorePlan, says)."""
    # The command's own arguments are checked against the YAML's teacher block before Axolotl loads (and
    # prints) the whole config, so a usage error is the first thing the user reads.
    source = getattr(teacher, "source", None)
    precomputed = source == "precomputed"
    cross_tokenizer = cross_tokenizer or bool(getattr(teacher, "cross_tokenizer", False))
    if cross_tokenizer and teacher is not None:  # student tokens kept per position, as training keeps them
        top_k = top_k or teacher.cross_tokenizer_top_k
    top_k = top_k or (teacher.top_k if source in ("precomputed", "server") and teacher.top_k else 64)
    server_block = None
    if server is not None:
        checked(check_base_url, server, "--server")
        server_block = ServerTeacher(base_url=server, model=server_model, top_k=top_k)
    elif source == "server" and teacher_path is None:
        server_block = teacher.model_copy(update={"top_k": top_k, "model": server_model or teacher.model})
    if server_block is not None and cross_tokenizer:
        raise click.UsageError("--cross-tokenizer (xkd.teacher.cross_tokenizer) aligns a teacher model loaded here; it "
                               "does not yet combine with a teacher server. Drop --server (or use a `source: model` "
                               "block), or use a teacher of the student's tokenizer.")
    teacher_key = "--teacher" if teacher_path else ("xkd.teacher.model_path" if precomputed else "xkd.teacher.path")
    if server_block is None:
        teacher_path = teacher_path or (teacher.model_path if precomputed else getattr(teacher, "path", None))
    out = out or (teacher.path if precomputed else None)
    if teacher_path is None and server_block is None:
        raise click.UsageError("no teacher: pass --teacher PATH or --server URL, or set xkd.teacher.model_path / path")
    if out is None:
        raise click.UsageError(
            "no output folder: pass --out DIR or set `xkd.teacher: {source: precomputed, path: DIR}`"
        )
    block = server_block or _model_block(teacher, teacher_path, cross_tokenizer=cross_tokenizer, top_k=top_k)
    if server_block is None:
        checked(check_model_location, teacher_path, teacher_key)
        if block.tokenizer_path is not None:
            checked(check_model_location, block.tokenizer_path, "xkd.teacher.tokenizer_path")

    from axolotl.cli.config import load_cfg

    from axolotl_xkd.args import GenerationSettings
    from axolotl_xkd.store.write import PrecomputeSettings, run_precompute

    cfg = load_cfg(config)
    xkd = XKDConfig.model_validate(dict(cfg["xkd"])) if cfg.get("xkd") is not None else None
    sampling = None
    if generate or (xkd is not None and xkd.sequences == "teacher"):
        sampling = xkd.generation if xkd is not None else GenerationSettings()
    settings = PrecomputeSettings(out=out, teacher=block, top_k=top_k, batch_size=batch_size,
                                  rows_per_shard=rows_per_shard, logprob_dtype=logprob_dtype, generate=sampling,
                                  seed=seed if seed is not None else int(cfg.get("seed") or 0),
                                  teacher_name=teacher_name, **plan)
    manifest = run_precompute(cfg, settings, rank=int(os.environ.get("RANK", "0")),
                              world_size=int(os.environ.get("WORLD_SIZE", "1")))
    click.echo(f"xkd precompute: {out} (k={manifest.top_k}, {manifest.splits} rows, {manifest.encoding}, "
               f"sequences: {manifest.sequences})")


def _model_block(teacher: Teacher | None, teacher_path: str, *, cross_tokenizer: bool, top_k: int) -> ModelTeacher:
    """The `source: model` block of the teacher to run here: the config's own when it names `teacher_path` (so its
    tokenizer_path, trust_remote_code and attn_implementation load it as training does), else one for --teacher or
    xkd.teacher.model_path; across tokenizers, with `top_k` student tokens per position. The precompute places the
    whole teacher itself (`store.write.teacher_placement`: its dtype, no ZeRO-3 offload)."""
    same = getattr(teacher, "source", None) == "model" and teacher.path == teacher_path
    block = teacher if same else ModelTeacher(path=teacher_path)
    return block.model_copy(update={"dtype": None, "offload": False, "cross_tokenizer": cross_tokenizer,
                                    "cross_tokenizer_top_k": top_k})


def _named_stores(config: str, name: str | None) -> list[tuple[str, PrecomputedTeacher]]:
    """The (name, block) of each `source: precomputed` item of the YAML's xkd.teachers (only `name`'s when given);
    empty without xkd.teachers."""
    raw = yaml.safe_load(Path(config).read_text())
    xkd = raw.get("xkd") if isinstance(raw, dict) else None
    items = xkd.get("teachers") if isinstance(xkd, dict) else None
    if not items:
        if name is not None:
            raise click.UsageError("--name selects a teacher of xkd.teachers, which this config does not have")
        return []
    every = [(item.get("name"), item) for item in items
             if isinstance(item, dict) and item.get("source") == "precomputed"]
    stores = [(n, item) for n, item in every if name is None or n == name]
    if not stores:
        known = [n for n, _ in every] or "none"
        raise click.UsageError(f"xkd.teachers has no `source: precomputed` teacher{f' named {name!r}' if name else ''} "
                               f"to write a store for (its precomputed teachers: {known})")
    blocks = []
    for n, item in stores:
        fields = {k: v for k, v in item.items() if k not in ("name", "weight")}
        try:
            blocks.append((n, _TEACHER.validate_python(fields)))
        except ValidationError as error:
            raise click.BadParameter(f"{config}: xkd.teachers item {n!r}: {error}", param_hint="CONFIG") from None
    return blocks


def _planned(config: str, named: list[tuple[str, PrecomputedTeacher]],
             generate: bool) -> list[tuple[str, PrecomputedTeacher, dict]]:
    """The named stores with how each is written: as they are, or under xkd.sequences: teacher in the order and with
    the sampling model and rows store.generated plans (one generation for every store)."""
    raw = yaml.safe_load(Path(config).read_text())
    try:
        xkd = XKDConfig.model_validate(raw["xkd"])
    except ValidationError as error:
        raise click.BadParameter(f"{config}: {error}", param_hint="CONFIG") from None
    if xkd.sequences != "teacher":
        if generate:
            raise click.UsageError("--generate with xkd.teachers: set xkd.sequences: teacher (with xkd.generator, "
                                   "docs/teachers.md#many-teachers), so that every store records the same generated "
                                   "rows")
        return [(n, block, {}) for n, block in named]
    from axolotl_xkd.routing import entry_teachers
    from axolotl_xkd.store.generated import store_plans

    plans = {plan.name: plan for plan in store_plans(xkd, entry_teachers(raw))}
    order = list(plans)
    return [(n, block, plans[n].settings()) for n, block in sorted(named, key=lambda item: order.index(item[0]))]


def _teacher_block(config: str) -> Teacher | None:
    """The validated `xkd.teacher` block of the YAML file `config` (None when it has none), read without
    Axolotl, which prints the whole config as it loads it."""
    try:
        raw = yaml.safe_load(Path(config).read_text())
    except yaml.YAMLError as error:
        raise click.BadParameter(f"{config} is not valid YAML ({error})", param_hint="CONFIG") from None
    xkd = raw.get("xkd") if isinstance(raw, dict) else None
    teacher = xkd.get("teacher") if isinstance(xkd, dict) else None
    if teacher is None:
        return None
    try:
        return _TEACHER.validate_python(teacher)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(['xkd.teacher', *map(str, e['loc'][1:])])}: {e['msg']}" for e in error.errors(include_url=False)
        )
        raise click.BadParameter(f"{config}: {problems}", param_hint="CONFIG") from None
