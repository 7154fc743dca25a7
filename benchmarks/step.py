"""Whole-step benchmark: the real `axolotl train` step of plain SFT, GKD and X-KD (the plugin's defaults) with each
teacher source on the same student and data, as ratios to SFT measured in the same run, runs interleaved.

    python -m benchmarks.step [--quick] [--repeats 3] [--steps 12] [--max-seconds 3000] [--run-timeout 900]
        [--top-k 64] [--threads N] [--prompt-words 16] [--arms sft xkd_precomputed ...] [--profile]

Shapes (the issue's): vocabulary 32000, student hidden 256 x 4 layers, teacher hidden 512 x 4 layers, steps of
4 x 256 tokens (micro_batch_size 4, sequence_len 256, every row full length, no accumulation); `--quick`: vocabulary
2000, student 64 x 2, teacher 128 x 2, 4 x 64 tokens. Models, tokenizer (one word per token) and data (random words)
are built in code, untrained: the step's cost does not depend on what the weights know. `--prompt-words` sets the
prompt's share of each row (default 16 of 256 tokens; 127 is half, the shape of a chat turn): X-KD forms no logits at
prompt positions (chunked.py), SFT forms and masks them. Other than 16 it writes step_prompt<N>.md.

Arms: `sft` (Axolotl alone, no plugin), `gkd_model` (X-KD with the reward terms off, in-process teacher),
`gkd_cross` (the same with a teacher of another tokenizer, `cross_tokenizer: true`: the teacher's words under
shuffled ids, so the ratio to gkd_model is what re-tokenizing and aligning costs, top-k records included) and
`xkd_model`, `xkd_precomputed` (a top-k store written by `axolotl xkd precompute`), `xkd_server`
(`axolotl xkd serve-teacher` on loopback). Many teachers (issue 34): `gkd_route2`, `gkd_weighted2`, `gkd_confidence2`
are gkd_model with two in-process teachers of the student's tokenizer (`xkd.teachers` a and b: gkd_model's teacher and
one of the same shape from another seed) under `xkd.mixture` route (rows alternate a / b in the data's `teacher`
column, which every arm's data carries: Axolotl's tokenization drops raw columns), weighted and confidence; when any
of them runs, the report adds their ratios to gkd_model, the teachers' and the loss's logged shares of a step
(`xkd/teacher_time_share`, `xkd/loss_time_share`) and the verdict against the issue's targets (route at most 1.1x
gkd_model; a mixture at most gkd_model plus one more teacher forward plus 10%, see `MANY_TEACHERS_TARGETS`), and is
written to step_teachers.md (`step_teachers_quick.md`); `--profile` adds where a two-teacher step's time goes, the
teacher and loss parts of one batch of the shape and the whole step, timed in this process (`profile_teachers`).
Step time = trainable tokens of a step / Axolotl's own `tokens/train_per_sec_per_gpu` of that step (logged every
step), median over the steps after the first of every run; peak memory = the training process's peak resident set
(CPU) or Axolotl's `memory/max_allocated` (CUDA). On CUDA the runs use bf16 and flash-attention-2 where `flash_attn`
is installed (else sdpa). `--max-seconds` bounds the whole benchmark: no run starts after it (a run may take up to
`--run-timeout`), and the report covers the runs done. Writes benchmarks/results/step.md (`step_quick.md` with
--quick) with the CPU model, thread count and versions, and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import write_report
from benchmarks.harness import BIN, ENV, log_history, merged, run_cli, serve_teacher, write_config

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
ARMS = ("sft", "gkd_model", "gkd_cross", "xkd_model", "xkd_precomputed", "xkd_server", "gkd_route2", "gkd_weighted2",
        "gkd_confidence2")
MANY = ("gkd_route2", "gkd_weighted2", "gkd_confidence2")
"""The arms of two teachers (a: gkd_model's teacher, b: the same shape from another seed), one per `xkd.mixture`."""
MANY_TEACHERS_TARGETS = """\
Targets (issue 34 item 5), each against gkd_model (one in-process teacher) of the same run:
- route: t(gkd_route2) <= 1.1 x t(gkd_model) (each row runs through its own teacher only);
- weighted, confidence: t(mix) <= t(gkd_model) x (1 + s + 0.1), with s gkd_model's median logged
  `xkd/teacher_time_share`: one teacher forward is s x t(gkd_model), so the bound is gkd_model's step, one more
  teacher forward and 10% of gkd_model's step. gkd_model's teacher time is its decoder only (the chunked loss forms
  its output layer chunk by chunk, inside the loss share), so s x t(gkd_model) undercounts a whole teacher forward by
  the teacher's output layer."""


@dataclass(frozen=True)
class Shape:
    vocab: int
    student: tuple[int, int]  # hidden, layers
    teacher: tuple[int, int]
    batch: int
    tokens: int


FULL = Shape(vocab=32000, student=(256, 4), teacher=(512, 4), batch=4, tokens=256)
QUICK = Shape(vocab=2000, student=(64, 2), teacher=(128, 2), batch=4, tokens=64)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_assets(out: Path, shape: Shape, rows: int, seed: int = 0, prompt_words: int = 16) -> dict[str, Path]:
    """A word-level tokenizer of `shape.vocab` tokens, an untrained student and teacher over it, and `rows` rows of
    random words that tokenize to exactly `shape.tokens` tokens (BOS, a `prompt_words`-word prompt, the response,
    EOS)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    words = [f"\u2581w{i}" for i in range(shape.vocab - len(SPECIALS))]
    tokenizer = word_tokenizer(words)
    paths = {name: out / name for name in ("student", "teacher", "teacher_cross", "teacher_b", "data")}
    for name, (hidden, layers) in (("student", shape.student), ("teacher", shape.teacher)):
        torch.manual_seed(seed + len(name))
        config = LlamaConfig(vocab_size=shape.vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                             num_hidden_layers=layers, num_attention_heads=hidden // 64 or 1,
                             num_key_value_heads=hidden // 64 or 1, max_position_embeddings=shape.tokens,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    # The teacher of another tokenizer (gkd_cross): the same words under shuffled ids, and the teacher's (the loop's
    # last model) embedding and output rows moved with them, so it is the same function of the text and every
    # position aligns.
    order = random.Random(seed).sample(range(len(words)), len(words))
    cross = word_tokenizer([words[i] for i in order])
    inverse = torch.tensor([*range(len(SPECIALS)), *(len(SPECIALS) + i for i in order)])  # new id -> old id
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight[inverse])
        model.lm_head.weight.copy_(model.lm_head.weight[inverse])
    model.save_pretrained(paths["teacher_cross"])
    cross.save_pretrained(paths["teacher_cross"])
    # The second teacher of the many-teacher arms: the teacher's shape and tokenizer, weights from another seed.
    torch.manual_seed(seed + 1000)
    LlamaForCausalLM(model.config).save_pretrained(paths["teacher_b"])
    tokenizer.save_pretrained(paths["teacher_b"])
    rng = random.Random(seed)
    words = [word[1:] for word in words]
    response_words = shape.tokens - prompt_words - 2  # BOS and EOS
    lines = []
    for i in range(rows):  # `teacher`: the route arm's column (a, b alternating); the other arms never read it
        lines.append(json.dumps({"prompt": " ".join(rng.choices(words, k=prompt_words)),
                                 "response": " " + " ".join(rng.choices(words, k=response_words)),
                                 "teacher": "ab"[i % 2]}))
    paths["data"].mkdir(parents=True, exist_ok=True)
    (paths["data"] / "train.jsonl").write_text("\n".join(lines) + "\n")
    return paths


def word_tokenizer(words: list[str]):
    """One token per `words` entry (each `▁` + a word; a space before every word, sentencepiece style, so that the
    cross-tokenizer alignment can read each token's text), BOS prepended, after the SPECIALS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def base(assets: dict[str, Path], work: Path, shape: Shape, steps: int, cuda: bool) -> dict:
    """The SFT config every arm starts from (the arms add the plugin and an `xkd:` block)."""
    flash = cuda and _installed("flash_attn")
    return {
        "base_model": str(assets["student"]),
        "datasets": [{"path": str(assets["data"] / "train.jsonl"), "ds_type": "json",
                      "type": {"field_instruction": "prompt", "field_output": "response", "format": "{instruction}",
                               "no_input_format": "{instruction}"}}],
        "train_on_inputs": False,
        "dataset_prepared_path": str(work / "prepared"),
        "val_set_size": 0,
        "sequence_len": shape.tokens,
        "sample_packing": False,
        "micro_batch_size": shape.batch,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "max_steps": steps,
        "optimizer": "adamw_torch",
        "learning_rate": 1e-4,
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "save_steps": steps,
        "seed": 42,
        "bf16": cuda,
        "fp16": False,
        "tf32": False,
        "attn_implementation": "flash_attention_2" if flash else "sdpa",
        "save_safetensors": True,
        "report_to": "none",
        "dataloader_num_workers": 0,
    }


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def arm_overrides(arm: str, assets: dict[str, Path], store: Path, url: str, top_k: int) -> dict:
    """The config changes of one arm on top of `base`."""
    if arm == "sft":
        return {}
    teachers = {
        "model": {"source": "model", "path": str(assets["teacher"])},
        "precomputed": {"source": "precomputed", "path": str(store)},
        "server": {"source": "server", "base_url": url, "top_k": top_k, "timeout_s": 120},
        "cross": {"source": "model", "path": str(assets["teacher_cross"]), "cross_tokenizer": True,
                  "cross_tokenizer_top_k": top_k},
    }
    kind, source = arm.split("_")
    if arm in MANY:
        mixture = source[:-1]
        xkd = {"teachers": [{"name": "a", **teachers["model"]},
                            {"name": "b", "source": "model", "path": str(assets["teacher_b"])}],
               "mixture": mixture, **({"route_column": "teacher"} if mixture == "route" else {})}
    else:
        xkd = {"teacher": teachers[source]}
    if kind == "gkd":
        xkd.update({"reward_kl_weight": 0.0, "td_weight": 0.0})
    return {"plugins": ["axolotl_xkd.XKDPlugin"], "xkd": xkd}


@dataclass
class Run:
    step_s: float  # median seconds per step, after the first
    tokens_per_s: float  # median tokens/train_per_sec_per_gpu, after the first step
    trainable: int  # tokens/trainable at the end
    peak_mb: float
    shares: dict[str, float]  # over the steps after the first: each logged xkd/<part>_time_share (median) and
    # xkd/teacher/<name>/share (mean); none for sft


def train_once(config: dict, path: Path, cuda: bool, timeout: float) -> Run:
    """One `axolotl train` of `config`; its per-step throughput from the logs and its peak memory."""
    env = {**os.environ, **ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    write_config(path, config)
    with open(path.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen([str(BIN / "axolotl"), "train", str(path)], env=env, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        # wait4, not Popen.wait: it also returns the peak resident set of the process tree.
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"axolotl train {path} failed ({proc.returncode}):\n"
                           f"{path.with_suffix('.log').read_text()[-6000:]}")
    logs = [e for e in log_history(Path(config["output_dir"])) if "loss" in e]
    trainable = [e["tokens/trainable"] for e in logs]
    steps = [b - a for a, b in zip(trainable, trainable[1:])]
    rates = [e.get("tokens/train_per_sec_per_gpu") for e in logs[1:]]
    if not rates or not all(rates):
        raise RuntimeError(f"axolotl train {path} did not log tokens/train_per_sec_per_gpu at every step: {logs}")
    gpu = [e["memory/max_allocated (GiB)"] * 1024 for e in logs if "memory/max_allocated (GiB)" in e]
    peak = max(gpu) if cuda and gpu else usage.ru_maxrss / 1024
    keys = sorted({k for e in logs[1:] for k in e if k.endswith("_time_share") or k.startswith("xkd/teacher/")})
    # time shares: the median step's; a teacher's served share: the run's mean (batches draw the route's rows at random)
    shares = {k: (statistics.median if k.endswith("_time_share") else statistics.mean)(e[k] for e in logs[1:] if k in e)
              for k in keys}
    return Run(statistics.median(s / r for s, r in zip(steps, rates)), statistics.median(rates), trainable[-1], peak,
               shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small check shape")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="steps per run (the first is not timed)")
    parser.add_argument("--max-seconds", type=float, default=3000, help="no run starts after this many seconds")
    parser.add_argument("--run-timeout", type=float, default=900, help="seconds one `axolotl train` may take")
    parser.add_argument("--top-k", type=int, default=64, help="top-k of the precomputed store and the server")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the runs (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="with many-teacher arms: also time the teacher and "
                        "loss parts of one batch in this process (one teacher against each mixture)")
    parser.add_argument("--prompt-words", type=int, default=16, help="prompt tokens of each row (of --quick's 64 "
                        "or the full shape's 256, less BOS, EOS and one response token)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from axolotl_xkd import __version__

    shape = QUICK if args.quick else FULL
    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="xkd_step_bench_"))
    if not 0 < args.prompt_words <= shape.tokens - 3:
        parser.error(f"--prompt-words must be in [1, {shape.tokens - 3}] for rows of {shape.tokens} tokens")
    assets = build_assets(work / "assets", shape, rows=shape.batch * args.steps * 2, prompt_words=args.prompt_words)
    config = base(assets, work, shape, args.steps, cuda)
    store = work / "topk"
    if "xkd_precomputed" in args.arms:
        precompute = merged(config, {"output_dir": str(work / "unused"),
                                     **arm_overrides("xkd_model", assets, store, "", args.top_k)})
        run_cli(["axolotl", "xkd", "precompute", str(write_config(work / "precompute.yml", precompute)), "--out",
                 str(store), "--top-k", str(args.top_k), "--teacher", str(assets["teacher"])])
    runs: dict[str, list[Run]] = {arm: [] for arm in args.arms}
    with serve_teacher(assets["teacher"]) if "xkd_server" in args.arms else contextlib.nullcontext("") as url:
        for r in range(args.repeats):
            for arm in args.arms:
                left = args.max_seconds - (time.perf_counter() - started)
                if left <= 0:
                    break
                out = work / f"{arm}-{r}"
                run = merged(config, {"output_dir": str(out / "model"),
                                      **arm_overrides(arm, assets, store, url, args.top_k)})
                runs[arm].append(train_once(run, out / "cfg.yml", cuda, timeout=args.run_timeout))
                print(f"{arm} repeat {r}: {runs[arm][-1].step_s * 1000:.1f} ms/step", flush=True)
    profile = profile_teachers(assets, shape, args.prompt_words) if args.profile and set(MANY) & set(args.arms) else []
    report = render(args, shape, runs, cuda, __version__, time.perf_counter() - started) + "".join(
        line + "\n" for line in profile)
    name = ("step_teachers" if set(MANY) & set(args.arms) else "step") + ("_quick" if args.quick else "")
    write_report(RESULTS / f"{name}{'' if args.prompt_words == 16 else f'_prompt{args.prompt_words}'}.md", report)


def profile_teachers(assets: dict[str, Path], shape: Shape, prompt_words: int, repeats: int = 9) -> list[str]:
    """The teacher and loss parts of one batch of `shape` (random ids, the prompt masked) timed in this process on
    one torch thread (a shared 2-core machine makes two threads wait on each other), the fastest of `repeats` calls
    each: gkd_model's (the teacher's decoder, then the chunked loss forming its logits per chunk) against two
    teachers a and b under each mixture (rows 0, 2 routed to a, 1, 3 to b)."""
    import torch
    from transformers import LlamaForCausalLM

    from axolotl_xkd.keys import ROUTE
    from axolotl_xkd.losses.chunked import chunked_xkd_loss
    from axolotl_xkd.losses.xkd import XKDHyperparams
    from axolotl_xkd.teachers.mixture import Member, MixtureTeacherSource
    from axolotl_xkd.teachers.model import ModelTeacherSource

    def load(name: str):
        return LlamaForCausalLM.from_pretrained(assets[name], attn_implementation="sdpa").eval().requires_grad_(False)

    student = LlamaForCausalLM.from_pretrained(assets["student"], attn_implementation="sdpa")
    a, b = ModelTeacherSource(load("teacher"), shape.vocab), ModelTeacherSource(load("teacher_b"), shape.vocab)
    ids = torch.randint(len(SPECIALS), shape.vocab, (shape.batch, shape.tokens))
    labels = ids.clone()
    labels[:, : prompt_words + 1] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    routed = {**batch, ROUTE: (torch.arange(shape.batch) % 2).unsqueeze(-1).expand_as(ids).contiguous()}
    halves = [{k: v[j :: 2] for k, v in batch.items()} for j in (0, 1)]
    members = [Member("a", a), Member("b", b)]
    sources = {m: MixtureTeacherSource(members, mixture=m, vocab_size=shape.vocab, top_k=64)
               for m in ("route", "weighted", "confidence")}
    params = XKDHyperparams(reward_kl_weight=0.0, td_weight=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def best_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times) * 1000

    def loss(signal) -> None:
        hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state.detach().requires_grad_(True)
        chunked_xkd_loss(hidden, student.lm_head.weight, labels, teacher=signal, params=params, mu=None,
                         log_sigma=None, vocab_size=shape.vocab).loss.backward()
        student.zero_grad(set_to_none=True)

    with torch.no_grad():
        decoders = {"route": best_ms(lambda: [t.get_hidden_signal(h) for t, h in zip((a, b), halves)]),
                    "weighted": best_ms(lambda: [t.get_hidden_signal(batch) for t in (a, b)])}
        decoders["confidence"] = decoders["weighted"]
        hidden_ms = {m: best_ms(lambda m=m: sources[m].get_hidden_signal(dict(routed if m == "route" else batch)))
                     for m in sources}
        parts = {
            "one teacher's decoder (gkd_model's teacher part: `get_hidden_signal`)": best_ms(
                lambda: a.get_hidden_signal(batch)),
            "one teacher's whole forward, logits (B, T, V) included (`get_signal`)": best_ms(
                lambda: a.get_signal(batch)),
            "route's decoders: each teacher on its 2 of 4 rows": decoders["route"],
            "weighted's and confidence's decoders: both teachers on every row": decoders["weighted"],
            **{f"the mixture source's `get_hidden_signal`, {m} (the teachers unmixed)": ms
               for m, ms in hidden_ms.items()},
            **{f"{m}: what `get_hidden_signal` adds to the decoders (placing)": hidden_ms[m] - decoders[m]
               for m in sources},
        }
        hidden_signal = a.get_hidden_signal(batch)
        unmixed = {m: sources[m].get_hidden_signal(dict(routed if m == "route" else batch)) for m in sources}
    parts["chunked loss forward + backward, one teacher's hidden states (gkd_model: its logits formed per chunk)"] = (
        best_ms(lambda: loss(hidden_signal)))
    for m, signal in unmixed.items():
        parts[f"chunked loss forward + backward, {m}: two teachers mixed per chunk"] = best_ms(
            lambda signal=signal: loss(signal))

    # The whole step in this process, the arms interleaved: the student's forward, the teacher's signal, the chunked
    # loss, the backward pass and AdamW's step (what XKDTrainer does around Axolotl's loop, less the data and logs).
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    signal_of = {"gkd_model": lambda: a.get_hidden_signal(batch),
                 **{f"gkd_{m}2": lambda m=m: sources[m].get_hidden_signal(dict(routed if m == "route" else batch))
                    for m in sources}}

    def whole_step(signal) -> tuple[float, float]:
        start = time.perf_counter()
        hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
        asked = time.perf_counter()
        with torch.no_grad():
            teacher = signal()
        teacher_s = time.perf_counter() - asked
        chunked_xkd_loss(hidden, student.lm_head.weight, labels, teacher=teacher, params=params, mu=None,
                         log_sigma=None, vocab_size=shape.vocab).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, teacher_s

    steps = {arm: (math.inf, 0.0) for arm in signal_of}
    for round_ in range(repeats + 1):  # the first round warms up
        for arm, signal in signal_of.items():
            took = whole_step(signal)
            if round_ and took[0] < steps[arm][0]:
                steps[arm] = took
    torch.set_num_threads(threads)
    lines = ["", "## Where a two-teacher step's time goes (`--profile`)", "",
             (f"One batch of {shape.batch} x {shape.tokens} tokens, random ids, in this process (one torch thread, "
              f"load average {os.getloadavg()[0]:.1f} at the end); each part the fastest of {repeats} calls."), "",
             "| part | ms |", "|---|---|"]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in parts.items()]
    t_one, teacher_one = steps["gkd_model"]
    whole = parts["one teacher's whole forward, logits (B, T, V) included (`get_signal`)"] / 1000
    lines += ["", ("The whole step in this process (student forward, teacher signal, chunked loss, backward, AdamW "
                   f"step; arms interleaved, the fastest of {repeats} rounds after one to warm up), against the same "
                   "targets; s = gkd_model's teacher seconds / its step here. Last column: the mixtures' bound with "
                   "a whole teacher forward (its output layer included, the part above) in place of s x t(gkd_model)."),
              "",
              "| arm | step ms | teacher ms | / gkd_model | bound / gkd_model | target | bound with a whole forward |",
              "|---|---|---|---|---|---|---|"]
    for arm, (t, teacher) in steps.items():
        if arm == "gkd_model":
            lines.append(f"| {arm} | {t * 1000:.1f} | {teacher * 1000:.1f} | 1.00x | - | - | - |")
            continue
        bound, verdict = _verdict(arm, t, t_one, teacher_one / t_one)
        alternative = "-" if arm == "gkd_route2" else (
            f"{(t_one * 1.1 + whole) / t_one:.2f}x: {'met' if t <= t_one * 1.1 + whole else 'missed'}")
        lines.append(f"| {arm} | {t * 1000:.1f} | {teacher * 1000:.1f} | {t / t_one:.2f}x | {bound / t_one:.2f}x | "
                     f"{verdict} | {alternative} |")
    return lines


def _verdict(arm: str, t: float, t_one: float, s_one: float) -> tuple[float, str]:
    """An arm's bound (seconds) and verdict against MANY_TEACHERS_TARGETS, from gkd_model's step `t_one` and its
    teacher share `s_one`."""
    bound = 1.1 * t_one if arm == "gkd_route2" else t_one * (1 + s_one + 0.1)
    return bound, f"**{'met' if t <= bound else 'missed'}** ({t / t_one:.2f}x vs {bound / t_one:.2f}x)"


def render(args, shape: Shape, runs: dict[str, list[Run]], cuda: bool, version: str, seconds: float) -> str:
    """The markdown report: conditions, then one row per arm (median of the repeats, ratio to SFT's median)."""
    import torch
    import transformers
    from importlib.metadata import version as installed

    sft = statistics.median(r.step_s for r in runs["sft"]) if runs.get("sft") else None
    device = torch.cuda.get_device_name() if cuda else "cpu"
    lines = [
        "# Whole-step benchmark" + (" (--quick)" if args.quick else ""),
        "",
        f"`python -m benchmarks.step {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"- date {datetime.now(UTC).isoformat(timespec='seconds')}, axolotl_xkd {version}, axolotl "
        f"{installed('axolotl')}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"- CPU **{cpu_model()}**, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end, torch "
        f"threads {torch.get_num_threads()}"
        f"{', OMP_NUM_THREADS ' + os.environ['OMP_NUM_THREADS'] if 'OMP_NUM_THREADS' in os.environ else ''}; "
        f"device {device}{', bf16' if cuda else ', fp32'}",
        f"- vocabulary {shape.vocab}, student hidden {shape.student[0]} x {shape.student[1]} layers, teacher hidden "
        f"{shape.teacher[0]} x {shape.teacher[1]} layers, {shape.batch} x {shape.tokens} tokens per step "
        f"({args.prompt_words} prompt words), "
        f"{args.steps} steps per run (the first not timed), top-k {args.top_k}; {seconds:.0f} s in all",
        "- step time = a step's trainable tokens / Axolotl's `tokens/train_per_sec_per_gpu` for it, median over the "
        "steps of a run, then over the repeats (runs interleave the arms); peak memory: "
        + ("Axolotl's memory/max_allocated" if cuda else "peak RSS of the `axolotl train` process tree"),
        "- logged tokens/s: Axolotl's `tokens/train_per_sec_per_gpu` as a run logs it (trainable tokens, labels other "
        "than -100, since the previous log over the wall time since it: the teacher's forward, the loss, the "
        "optimizer and any save in between included; the first log has none); SFT / arm: SFT's over the arm's, the "
        "ratio a user reads off two runs' logs (docs/benchmarks.md)",
        "",
        "| arm | ms/step (each repeat) | median ms/step | / SFT | logged tokens/s per GPU | SFT / arm (logged) | "
        "trainable tokens | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sft_rate = statistics.median(r.tokens_per_s for r in runs["sft"]) if runs.get("sft") else None
    for arm, done in runs.items():
        if not done:
            lines.append(f"| {arm} | not run (time bound) | | | | | | |")
            continue
        median = statistics.median(r.step_s for r in done)
        ratio = f"{median / sft:.2f}x" if sft else "-"
        rate = statistics.median(r.tokens_per_s for r in done)
        logged = f"{sft_rate / rate:.2f}x" if sft_rate else "-"
        lines.append(f"| {arm} | {', '.join(f'{r.step_s * 1000:.1f}' for r in done)} | {median * 1000:.1f} | {ratio} | "
                     f"{rate:.0f} | {logged} | {done[-1].trainable} | {max(r.peak_mb for r in done):.0f} |")
    if set(MANY) & set(runs):
        lines += many_teachers(runs)
    return "\n".join(lines) + "\n"


def _share(done: list[Run], key: str) -> float:
    """The median over the repeats of a run's median logged share `key` (0 where it was not logged)."""
    return statistics.median(r.shares.get(key, 0.0) for r in done)


def many_teachers(runs: dict[str, list[Run]]) -> list[str]:
    """The many-teacher section: each arm against gkd_model (ratio, where its step goes, the bound) and the verdict."""
    lines = ["", "## Two teachers against one (gkd_model)", "", *MANY_TEACHERS_TARGETS.splitlines(), ""]
    one = runs.get("gkd_model")
    if not one:
        return lines + ["gkd_model was not run: no ratio."]
    t_one = statistics.median(r.step_s for r in one)
    s_one = _share(one, "xkd/teacher_time_share")
    lines += [("| arm | median ms/step | / gkd_model | / gkd_model of the same repeat | teacher share | teacher ms | "
               "loss share | loss ms | rows or positions per teacher (a / b) | bound ms | bound / gkd_model | "
               "target |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in ("gkd_model", *MANY):
        done = runs.get(arm)
        if not done:
            if arm in runs:
                lines.append(f"| {arm} | not run (time bound) | | | | | | | | | | |")
            continue
        t = statistics.median(r.step_s for r in done)
        teacher, loss = _share(done, "xkd/teacher_time_share"), _share(done, "xkd/loss_time_share")
        served = (f"{_share(done, 'xkd/teacher/a/share'):.2f} / {_share(done, 'xkd/teacher/b/share'):.2f}"
                  if arm in MANY else "-")
        if arm == "gkd_model":
            bound, target = None, "-"
        else:
            bound, target = _verdict(arm, t, t_one, s_one)
        paired = ", ".join(f"{r.step_s / o.step_s:.2f}x" for r, o in zip(done, one))
        lines.append(f"| {arm} | {t * 1000:.1f} | {t / t_one:.2f}x | {paired} | {teacher:.3f} | "
                     f"{teacher * t * 1000:.1f} | "
                     f"{loss:.3f} | {loss * t * 1000:.1f} | {served} | "
                     f"{'-' if bound is None else f'{bound * 1000:.1f}'} | "
                     f"{'-' if bound is None else f'{bound / t_one:.2f}x'} | {target} |")
    lines += ["", ("teacher / loss ms: the arm's median logged share x its median step time (the teacher's signal, the "
                   "mixture's included; the loss's forward, which in the chunked loss also forms the output layer's "
                   "gradients and gkd_model's teacher logits).")]
    return lines


if __name__ == "__main__":
    main()
