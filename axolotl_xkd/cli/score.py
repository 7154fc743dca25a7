"""`axolotl xkd score`: score responses with an X-KD student's learned reward, or sample and rerank (JSONL in/out).

Heavy imports (torch, transformers) happen inside the command, so `axolotl --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


def read_jsonl_field(path: Path, field: str, option: str, field_option: str) -> list[str]:
    """The string `field` of every row of the JSONL file at `path`; errors name the file, line and option."""
    values = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise click.BadParameter(f"{path}:{number} is not valid JSON ({error.msg})", param_hint=option) from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise click.BadParameter(
                f"{path}:{number} has no string field {field!r}; each line must be an object like "
                f'{{"{field}": "..."}} (choose the field with {field_option})',
                param_hint=option,
            )
        values.append(row[field])
    if not values:
        raise click.BadParameter(f"{path} has no rows", param_hint=option)
    return values


@click.command("score")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Student directory of an X-KD run (holds xkd_reward_head.safetensors and .json).")
@click.option("--prompts", "prompts_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL with one prompt per line.")
@click.option("--responses", "responses_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL with one response per line, aligned with --prompts (may be the same file).")
@click.option("--samples", type=click.IntRange(min=1), help="Generate this many responses per prompt and rerank them.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Output JSONL (default: stdout).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Pairs per forward pass (with --samples: prompts per generate call).")
@click.option("--per-token", is_flag=True, help="Add token ids, tokens, mu_i and sigma_i per response token.")
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed (--samples).")
@click.option("--rank-by", type=click.Choice(["logprob", "sum", "mean"]), default="logprob", show_default=True,
              help="Rerank by the student's log-likelihood (the better pick in the reranking benchmark, "
              "docs/reward.md), or the summed or mean mu_i over the response tokens (--samples).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1),
              help="Longest sampled response in tokens (--samples).")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Sampling temperature (--samples).")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Nucleus sampling (--samples).")
@click.option("--no-eos", is_flag=True, help="Plain strings only (--raw, or no training config found): do not "
              "append EOS to --responses before scoring (default: append, as in training, so the reward of ending "
              "the response counts).")
@click.option("--prompt-field", default="prompt", show_default=True, help="JSON field of the prompt.")
@click.option("--response-field", default="response", show_default=True, help="JSON field of the response.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The Axolotl config the student was trained with: each prompt (and response) is rendered by its "
              "dataset's own Axolotl prompt strategy (alpaca-style `type:` dicts, alpaca, chat_template), exactly as "
              "training tokenized it. Default: the config Axolotl saved in the model folder's README.md (the "
              "output_dir's, for a checkpoint-N folder), if there is one.")
@click.option("--dataset-index", default=0, show_default=True, type=click.IntRange(min=0),
              help="Which entry of the config's datasets: gives the prompt format.")
@click.option("--raw", is_flag=True, help="Ignore any training config: tokenize prompts as plain strings (BOS, "
              "prompt) and responses as plain strings plus EOS.")
def score(model_dir: Path, prompts_file: Path, responses_file: Path | None, samples: int | None, out_file: Path | None,
          batch_size: int, per_token: bool, seed: int, rank_by: str, max_new_tokens: int, temperature: float,
          top_p: float, no_eos: bool, prompt_field: str, response_field: str, device: str, dtype: str,
          config_file: Path | None, dataset_index: int, raw: bool) -> None:
    """Score responses with the reward head learned by X-KD, or sample N per prompt and rerank them.

    Prompts and responses are plain strings (JSONL). They are rendered as training rendered them, with
    the prompt format of the training config (--config, else the config saved in the model folder);
    the reward depends on it. --raw scores the plain strings instead. See docs/scoring.md.

    With --responses, writes one line per pair: prompt, response, reward_sum, reward_mean, num_tokens,
    logprob_sum, finished. With --samples N, writes one line per prompt: prompt, best (the top
    response) and samples (all N, best first, each scored as above).
    """
    if (responses_file is None) == (samples is None):
        raise click.UsageError("give exactly one of --responses FILE (score them) or --samples N (sample and rerank)")
    if raw and config_file is not None:
        raise click.UsageError("give --config CONFIG.yml (render as training did) or --raw (plain strings), not both")
    prompts = read_jsonl_field(prompts_file, prompt_field, "--prompts", "--prompt-field")
    responses = None
    if responses_file is not None:
        responses = read_jsonl_field(responses_file, response_field, "--responses", "--response-field")
        if len(responses) != len(prompts):
            raise click.BadParameter(
                f"{responses_file} has {len(responses)} responses but {prompts_file} has {len(prompts)} prompts; "
                "they are paired line by line", param_hint="--responses")

    from axolotl_xkd.scoring import RANK_FIELDS, TrainingFormat, load_scorer, saved_training_config

    config = None
    if config_file is not None:
        config = (config_file.read_text(encoding="utf-8"), str(config_file))
    elif not raw:
        config = saved_training_config(model_dir)
    if config is not None and no_eos:
        raise click.UsageError(f"--no-eos applies to plain strings; with the training config ({config[1]}) the "
                               "response ends where training ended it. Add --raw to score plain strings.")
    prompt_ids = response_ids = None
    try:
        scorer = load_scorer(model_dir, device=device, dtype=dtype)
        if config is not None:
            click.echo(f"rendering prompts with the training config {config[1]}, datasets[{dataset_index}] "
                       "(--raw: plain strings)", err=True)
            form = TrainingFormat.from_yaml(config[0], scorer.tokenizer, where=config[1], dataset_index=dataset_index)
            if responses is not None:
                prompt_ids, response_ids = form.render(prompts, responses)
            else:
                prompt_ids = form.render_prompts(prompts)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    if responses is not None and response_ids is not None:
        scored = scorer.score_ids(prompt_ids, response_ids, prompts=prompts, responses=responses,
                                  batch_size=batch_size, progress=True)
        rows = [s.to_json(per_token=per_token, tokenizer=scorer.tokenizer) for s in scored]
    elif responses is not None:
        scored = scorer.score(prompts, responses, batch_size=batch_size, append_eos=not no_eos, progress=True)
        rows = [s.to_json(per_token=per_token, tokenizer=scorer.tokenizer) for s in scored]
    else:
        ranked = scorer.rerank(prompts, samples, rank_by=rank_by, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size, progress=True,
                               prompt_ids=prompt_ids)
        rows = []
        for prompt, group in zip(prompts, ranked):
            rows.append({
                "prompt": prompt,
                "best": group[0].response,
                "rank_by": RANK_FIELDS[rank_by],
                "samples": [{k: v for k, v in s.to_json(per_token=per_token, tokenizer=scorer.tokenizer).items()
                             if k != "prompt"} for s in group],
            })
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if out_file is None:
        sys.stdout.write(text)
    else:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(text)
        click.echo(f"wrote {len(rows)} rows to {out_file}", err=True)
