"""`axolotl xkd score`: score responses with an X-KD student's learned reward, or sample and rerank (JSONL in/out).

Heavy imports (torch, transformers) happen inside the command, so `axolotl --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from axolotl_xkd.options import DTYPE_NAMES, RANK_FIELDS


def read_jsonl_rows(path: Path, option: str) -> list[dict]:
    """The JSON objects of the JSONL file at `path`; errors name the file, line and option."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise click.BadParameter(f"{path}:{number} is not valid JSON ({error.msg})", param_hint=option) from None
        if not isinstance(row, dict):
            raise click.BadParameter(f"{path}:{number} is not a JSON object", param_hint=option)
        rows.append(row)
    if not rows:
        raise click.BadParameter(f"{path} has no rows", param_hint=option)
    return rows


def pick_field(rows: list[dict], path: Path, field: str, option: str, field_option: str,
               dataset_fields: tuple[str, ...] = ()) -> list[str | dict]:
    """Each row's string `field`; or, where `dataset_fields` are given (a training format renders the prompts), the
    whole row when it has the dataset's own fields, so that all of them render (an alpaca row's input with its
    instruction, even when `field` names the instruction)."""
    values: list[str | dict] = []
    for number, row in enumerate(rows, start=1):
        if dataset_fields and all(name in row for name in dataset_fields):
            values.append(row)
        elif isinstance(row.get(field), str):
            values.append(row[field])
        else:
            also = f", nor the training dataset's own fields {list(dataset_fields)}" if dataset_fields else ""
            raise click.BadParameter(
                f"{path}:{number} has no string field {field!r}{also}; each line must be an object like "
                f'{{"{field}": "..."}} (choose the field with {field_option})',
                param_hint=option,
            )
    return values


def read_inputs(prompts_file: Path, prompt_field: str, responses_file: Path | None, response_field: str,
                dataset_fields: tuple[str, ...]) -> tuple[list[str | dict], list[str] | None]:
    """The prompts (strings, or dataset rows where `dataset_fields` are given) and the responses paired with them."""
    prompts = pick_field(read_jsonl_rows(prompts_file, "--prompts"), prompts_file, prompt_field, "--prompts",
                         "--prompt-field", dataset_fields)
    if responses_file is None:
        return prompts, None
    responses = pick_field(read_jsonl_rows(responses_file, "--responses"), responses_file, response_field,
                           "--responses", "--response-field")
    if len(responses) != len(prompts):
        raise click.BadParameter(
            f"{responses_file} has {len(responses)} responses but {prompts_file} has {len(prompts)} prompts; "
            "they are paired line by line", param_hint="--responses")
    return prompts, responses


def model_folder(model_dir: Path | None, config_file: Path | None) -> Path:
    """--model, or the output_dir of --config (where `axolotl train` saved the student and its reward head)."""
    if model_dir is not None:
        return model_dir
    if config_file is None:
        raise click.UsageError("give --model DIR (the output_dir of an X-KD run) or --config CONFIG.yml (its "
                               "output_dir is scored)")
    import yaml

    output_dir = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("output_dir")
    if not output_dir:
        raise click.UsageError(f"{config_file} sets no output_dir, so the trained student is unknown; add --model DIR")
    return Path(output_dir)


def training_config(model_dir: Path, config_file: Path | None, raw: bool) -> tuple[str, str] | None:
    """(YAML text, where) of the config that renders prompts: --config, else the one saved with the student; None
    with --raw."""
    from axolotl_xkd.scoring import saved_training_config

    if config_file is not None:
        return config_file.read_text(encoding="utf-8"), str(config_file)
    return None if raw else saved_training_config(model_dir)


def output_rows(scored, ranked, prompts: list[str], rank_by: str, per_token: bool, tokenizer) -> list[dict]:
    """The JSONL rows written: one per scored pair, or one per prompt with its ranked samples."""
    if scored is not None:
        return [s.to_json(per_token=per_token, tokenizer=tokenizer) for s in scored]
    from axolotl_xkd.options import RANK_FIELDS

    return [{
        "prompt": prompt,
        "best": group[0].response,
        "rank_by": RANK_FIELDS[rank_by],
        "samples": [{k: v for k, v in s.to_json(per_token=per_token, tokenizer=tokenizer).items() if k != "prompt"}
                    for s in group],
    } for prompt, group in zip(prompts, ranked)]


@click.command("score")
@click.option("--model", "model_dir", type=click.Path(path_type=Path),
              help="Student directory of an X-KD run (holds xkd_reward_head.safetensors and .json); default: the "
              "output_dir of --config.")
@click.option("--prompts", "prompts_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL with one prompt per line: a string field (--prompt-field), or, when a training config "
              "renders the prompts, a row of the training dataset itself (instruction with input, messages, text), "
              "which is rendered whole whenever a line has the dataset's fields.")
@click.option("--responses", "responses_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL with one response per line, aligned with --prompts (may be the same file).")
@click.option("--samples", type=click.IntRange(min=1), help="Generate this many responses per prompt and rerank them.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Output JSONL (default: stdout).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Pairs per forward pass (with --samples: prompts per generate call).")
@click.option("--per-token", is_flag=True, help="Add token ids, tokens, mu_i and sigma_i per response token.")
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed (--samples).")
@click.option("--rank-by", type=click.Choice(list(RANK_FIELDS)), default="logprob", show_default=True,
              help="Rerank by the student's log-likelihood (the better pick in the reranking benchmark, "
              "docs/reward.md), or the summed or mean mu_i over the response tokens (--samples).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1),
              help="Longest sampled response in tokens (--samples).")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Sampling temperature (--samples); 0 = greedy, as in the config's xkd.generation.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Nucleus sampling (--samples).")
@click.option("--no-eos", is_flag=True, help="Plain strings only (--raw, or no training config found): do not "
              "append EOS to --responses before scoring (default: append, as in training, so the reward of ending "
              "the response counts).")
@click.option("--prompt-field", default="prompt", show_default=True, help="JSON field of the prompt.")
@click.option("--response-field", default="response", show_default=True, help="JSON field of the response.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="float32", show_default=True)
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The Axolotl config the student was trained with: each prompt (and response) is rendered by its "
              "dataset's own Axolotl prompt strategy (alpaca-style `type:` dicts, the alpaca types, chat_template, "
              "completion), exactly as training tokenized it. Default: the config Axolotl saved in the model folder's "
              "README.md (the output_dir's, for a checkpoint-N folder), if there is one.")
@click.option("--dataset-index", default=0, show_default=True, type=click.IntRange(min=0),
              help="Which entry of the config's datasets: gives the prompt format.")
@click.option("--raw", is_flag=True, help="Ignore any training config: tokenize prompts as plain strings (BOS, "
              "prompt) and responses as plain strings plus EOS.")
def score(model_dir: Path | None, prompts_file: Path, responses_file: Path | None, samples: int | None,
          out_file: Path | None, batch_size: int, per_token: bool, seed: int, rank_by: str, max_new_tokens: int,
          temperature: float, top_p: float, no_eos: bool, prompt_field: str, response_field: str, device: str,
          dtype: str, config_file: Path | None, dataset_index: int, raw: bool) -> None:
    """Score responses with the reward head learned by X-KD, or sample N per prompt and rerank them.

    Prompts and responses are strings in JSONL rows (a prompt may also be a row of the training dataset). They are
    rendered as training rendered them, with the prompt format of the training config (--config, else the config
    saved in the model folder); the reward depends on it. --raw scores the plain strings instead. See
    docs/scoring.md.

    With --responses, writes one line per pair: prompt, response, reward_sum, reward_mean, num_tokens,
    logprob_sum, finished. With --samples N, writes one line per prompt: prompt, best (the top
    response) and samples (all N, best first, each scored as above).
    """
    if (responses_file is None) == (samples is None):
        raise click.UsageError("give exactly one of --responses FILE (score them) or --samples N (sample and rerank)")
    if raw and config_file is not None:
        raise click.UsageError("give --config CONFIG.yml (render as training did) or --raw (plain strings), not both")
    model_dir = model_folder(model_dir, config_file)
    config = training_config(model_dir, config_file, raw)
    if config is not None and no_eos:
        raise click.UsageError(f"--no-eos applies to plain strings; with the training config ({config[1]}) the "
                               "response ends where training ended it. Add --raw to score plain strings.")
    from axolotl_xkd.scoring import TrainingFormat, load_scorer

    try:
        scorer = load_scorer(model_dir, device=device, dtype=dtype)
        form = None if config is None else TrainingFormat.from_yaml(config[0], scorer.tokenizer, where=config[1],
                                                                   dataset_index=dataset_index)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    if form is not None:
        click.echo(f"prompts rendered as in training, with {config[1]}, datasets[{dataset_index}]; add --raw to "
                   "score plain strings instead", err=True)
    prompts, responses = read_inputs(prompts_file, prompt_field, responses_file, response_field,
                                     form.dataset_fields() if form is not None else ())
    scored = ranked = None
    try:
        if form is not None:
            prompt_ids, response_ids = form.render(prompts, responses) if responses is not None else (
                form.render_prompts(prompts), None)
            # A dataset row is shown as the prompt text it renders to.
            prompts = [p if isinstance(p, str) else scorer.tokenizer.decode(ids, skip_special_tokens=True)
                       for p, ids in zip(prompts, prompt_ids)]
        if responses is not None and form is not None:
            scored = scorer.score_ids(prompt_ids, response_ids, prompts=prompts, responses=responses,
                                      batch_size=batch_size, progress=True)
        elif responses is not None:
            scored = scorer.score(prompts, responses, batch_size=batch_size, append_eos=not no_eos, progress=True)
        else:
            ranked = scorer.rerank(prompts, samples, rank_by=rank_by, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                                   progress=True, prompt_ids=prompt_ids if form is not None else None)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    rows = output_rows(scored, ranked, prompts, rank_by, per_token, scorer.tokenizer)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if out_file is None:
        sys.stdout.write(text)
    else:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(text)
        click.echo(f"wrote {len(rows)} rows to {out_file}", err=True)
