"""The GPU check's driver: six named checks of the paths CI cannot run (it has no GPU), each trained for real with
`axolotl train` on tiny models, in one call of under 10 minutes on one H100. `bash benchmarks/gpu_check.sh` installs
what the machine lacks and runs it; docs/benchmarks.md ("GPU check") says what each check asserts.

  flash_packing    flash_attention_2 + bf16 + sample packing gives the first losses of the sdpa / fp32 packed run
                   (within 2%); skipped when flash_attn is not installed.
  qlora            a QLoRA student (adapter: qlora, load_in_4bit, bitsandbytes) with the in-process teacher, bf16:
                   trains with finite losses, saves the adapter and the reward head; `axolotl merge-lora` gives a
                   student that loads and runs (when the time budget leaves room).
  zero3            DeepSpeed ZeRO-3 on one GPU (example_configs/deepspeed/zero3.json), bf16: trains with finite
                   losses, saves the gathered student and a reward head that loads.
  cross_tokenizer  an in-process Gemma 3 teacher (tiny random Llama body over the real Gemma 3 tokenizer) into a Llama 3
                   student body, `cross_tokenizer: true`, bf16: both vocabularies and the coverage line are logged
                   (>= 90% of response positions covered), finite losses. Tokenizers from $XKD_TOKENIZER_CACHE.
  mixture          two in-process teachers mixed inside the chunked loss (`xkd.teachers`, `mixture: route`, each
                   teacher named by its `datasets:` entry), bf16 and packing: packed rows of both teachers train with
                   finite losses and both teachers serve positions at every step.
  throughput       X-KD on precomputed top-k data (format: axolotl_kd_v2) against Axolotl's KD plugin on the same
                   rows (the KD plugin's pre-tokenized columns), student, steps, bf16, packing and attention: the ratio
                   of their training speed, measured in the same call (no threshold: a number to record).

Each check prints `gpu_check: NAME PASS|FAIL|SKIP (seconds) reason` and its result goes into WORK/gpu_check.json; a
failing check does not stop the next; the exit status is 1 when any check failed. A check that would start past the
time budget (--budget-s) is skipped, so the call ends in time with its JSON. `--dry-run` (any machine, CPU is enough)
builds each check's assets and configs at small sizes and validates every config with Axolotl's own config loader,
and the throughput data with X-KD's KD v2 reader, without training.

Usage (repository root):  python -m benchmarks.gpu_check [--work DIR] [--checks NAME ...] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.harness import BIN, REPO, base_config, cli_env, free_port, merged, write_config

CHECKS = ("flash_packing", "qlora", "zero3", "cross_tokenizer", "mixture", "throughput")
# Rough seconds each check takes on one H100 (imports and model loads dominate; throughput's: the KD plugin's Liger
# loss is torch.compiled at its first step); a check starts only when its estimate still fits in the budget.
ESTIMATE_S = {"flash_packing": 90, "qlora": 60, "qlora_merge": 40, "zero3": 70, "cross_tokenizer": 70,
              "mixture": 50, "throughput": 170}
TOLERANCE = 0.02  # flash_packing: relative loss difference allowed in bf16
TIMING_PLUGIN = "benchmarks.gpu_timing.StepTimesPlugin"
COVERAGE_RE = re.compile(r"coverage after \d+ batches: (\d+) of (\d+) response positions")
VOCAB_RE = re.compile(r"student vocabulary (\d+) tokens, teacher (\d+)")


@dataclass
class Sizes:
    """The shapes of the assets: the GPU run's, or the dry run's (small enough for a CPU)."""

    teacher_steps: int = 200
    qlora_hidden: int = 256
    real_hidden: int = 64
    bench_hidden: int = 512
    bench_layers: int = 4
    bench_rows: int = 320  # about 35 packed steps of 2 x 2048 tokens: more than bench_steps
    bench_len: tuple[int, int] = (384, 512)
    bench_prompt: int = 32
    bench_top_k: int = 16
    bench_sequence_len: int = 2048
    bench_steps: int = 24


DRY = Sizes(teacher_steps=5, qlora_hidden=64, real_hidden=16, bench_hidden=32, bench_layers=1, bench_rows=16,
            bench_len=(48, 64), bench_prompt=8, bench_top_k=4, bench_sequence_len=128, bench_steps=2)


@dataclass
class Result:
    name: str
    status: str = "fail"  # pass | fail | skip
    reason: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


class CheckFailed(Exception):
    pass


class Skip(Exception):
    pass


class Runner:
    """The shared state of one call: the work folder, the clock, the attention kernel, the dry-run switch."""

    def __init__(self, work: Path, budget_s: float, dry_run: bool, small: bool = False) -> None:
        import torch

        self.work = work
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.dry_run = dry_run
        self.sizes = DRY if dry_run or small else Sizes()
        self.cuda = torch.cuda.is_available()
        self.validated: list[str] = []

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    # -- processes --------------------------------------------------------------------------------------------
    def cli(self, args: list[str], log: Path, *, timeout: float | None = None, env: dict | None = None) -> str:
        """Run a console script of this environment (`axolotl train ...`), output to `log`; its output, or
        CheckFailed with the log's tail."""
        exe = BIN / args[0] if (BIN / args[0]).exists() else shutil.which(args[0])
        if exe is None:
            raise CheckFailed(f"{args[0]} is not installed (PATH and {BIN})")
        timeout = max(30.0, min(timeout or 600.0, self.left() + 60))
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            try:
                proc = subprocess.run([str(exe), *args[1:]], check=False, cwd=REPO, env=cli_env(env), stdout=handle,
                                      stderr=subprocess.STDOUT, timeout=timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        text = log.read_text(errors="replace")
        if code != 0:
            raise CheckFailed(f"`{' '.join(args)}` failed ({code}); log {log}:\n{text[-4000:]}")
        return text

    def train(self, config: dict, name: str, *, env: dict | None = None) -> str:
        """`axolotl train` of `config` (written to WORK/NAME.yml, log WORK/NAME.log); its output."""
        path = write_config(self.work / f"{name}.yml", config)
        if self.dry_run:
            self.validate(path)
            return ""
        return self.cli(["axolotl", "train", str(path)], self.work / f"{name}.log", env=env)

    def validate(self, path: Path) -> None:
        """Axolotl's own config loading (plugins registered, pydantic validation of every key, the plugins' input
        schemas included), in a fresh process per config so that one config's plugins never validate another."""
        code = (
            "import sys, yaml\n"
            "from axolotl.cli.config import prepare_plugins\n"
            "from axolotl.utils.config import validate_config\n"
            "from axolotl.utils.dict import DictDefault\n"
            "cfg = DictDefault(yaml.safe_load(open(sys.argv[1])))\n"
            "prepare_plugins(cfg)\n"
            "cfg = validate_config(cfg)\n"
            "print('valid', cfg.base_model)\n"
        )
        proc = subprocess.run([sys.executable, "-c", code, str(path)], check=False, cwd=REPO, env=cli_env(),
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 or "valid" not in proc.stdout:
            raise CheckFailed(f"{path} does not validate:\n{proc.stderr[-3000:]}")
        self.validated.append(str(path))

    # -- assets -----------------------------------------------------------------------------------------------
    def tiny(self) -> dict[str, Path]:
        """The tiny arithmetic assets (`python -m axolotl_xkd.tiny`), built once per work folder."""
        out = self.work / "tiny"
        if not (out / "teacher" / "config.json").is_file():
            self.cli(["python", "-m", "axolotl_xkd.tiny", "--out", str(out), "--teacher-steps",
                      str(self.sizes.teacher_steps), "--log-every", "0"], self.work / "tiny.log")
        return {"student": out / "student", "tokenizer": out / "tokenizer", "teacher": out / "teacher",
                "data": out / "data"}

    def tiny_config(self, name: str, overrides: dict) -> dict:
        assets = self.tiny()
        config = merged(base_config(assets, self.work), {
            "sample_packing": True, "pad_to_sequence_len": True, "sequence_len": 128, "micro_batch_size": 2,
            "gradient_accumulation_steps": 1, "max_steps": 4, "logging_steps": 1, "save_steps": 4,
            "output_dir": str(self.work / name), "dataset_prepared_path": str(self.work / "prepared" / name)})
        return merged(config, overrides)


def attention() -> dict:
    """flash_attention_2 where flash_attn imports, else sdpa (the same for both runs of a comparison)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return {"attn_implementation": "sdpa"}
    return {"attn_implementation": "flash_attention_2"}  # Axolotl 0.19 refuses it with the legacy flash_attention


def losses(output_dir: Path) -> list[dict]:
    """The logged training steps of the newest checkpoint under `output_dir` (entries with a loss)."""
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints:
        raise CheckFailed(f"{output_dir} has no checkpoint")
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    return state["log_history"]


def finite_losses(output_dir: Path, steps: int) -> list[float]:
    logged = [e["loss"] for e in losses(output_dir) if "loss" in e]
    if len(logged) != steps or not all(math.isfinite(v) for v in logged):
        raise CheckFailed(f"{output_dir}: expected {steps} finite losses, got {logged}")
    return logged


def build_body(tokenizer, folder: Path, *, hidden: int, layers: int, seed: int, max_positions: int = 4096) -> Path:
    """A tiny random Llama over `tokenizer`'s vocabulary, saved with the tokenizer in `folder`."""
    from axolotl_xkd.tiny import build_model

    if not (folder / "config.json").is_file():
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = build_model(tokenizer, hidden=hidden, layers=layers, seed=seed)
        model.config.max_position_embeddings = max_positions  # RoPE positions beyond it work; Axolotl reads it
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


# -- the checks ---------------------------------------------------------------------------------------------------

def check_flash_packing(run: Runner) -> dict:
    if not run.dry_run and "flash_attention_2" not in attention()["attn_implementation"]:
        raise Skip("flash_attn is not installed (PyPI ships it as source only: build a wheel for this machine's "
                   "torch and CUDA and put it in runs/wheels)")
    runs = {"sdpa_fp32": {"attn_implementation": "sdpa", "bf16": False},
            "flash_bf16": {"attn_implementation": "flash_attention_2", "bf16": True,
                           "xkd": {"teacher": {"dtype": "bfloat16"}}}}
    got = {}
    for name, over in runs.items():
        config = run.tiny_config(f"flash_packing_{name}", over)
        run.train(config, f"flash_packing_{name}")
        if not run.dry_run:
            got[name] = {e["step"]: e["loss"] for e in losses(Path(config["output_dir"])) if "loss" in e}
    if run.dry_run:
        return {}
    ref, flash = got["sdpa_fp32"], got["flash_bf16"]
    rel = {s: abs(flash[s] - ref[s]) / abs(ref[s]) for s in ref}
    details = {"sdpa_fp32": ref, "flash_bf16": flash, "max_rel_diff": max(rel.values()), "tolerance": TOLERANCE}
    if not all(math.isfinite(v) for v in [*ref.values(), *flash.values()]) or details["max_rel_diff"] > TOLERANCE:
        raise CheckFailed(f"losses differ by {details['max_rel_diff']:.4f} > {TOLERANCE}: {details}")
    return details


def check_qlora(run: Runner) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.tiny()["tokenizer"])
    student = build_body(tokenizer, run.work / "assets" / "qlora_student", hidden=run.sizes.qlora_hidden, layers=2,
                         seed=3)
    config = run.tiny_config("qlora", {
        "base_model": str(student), "adapter": "qlora", "load_in_4bit": True, "lora_r": 8, "lora_alpha": 16,
        "lora_dropout": 0.0, "lora_target_linear": True, "bf16": True, **attention(),
        "xkd": {"teacher": {"dtype": "bfloat16"}}})
    run.train(config, "qlora")
    if run.dry_run:
        return {}
    out = Path(config["output_dir"])
    details = {"losses": finite_losses(out, 4)}
    for name in ("adapter_model.safetensors", "xkd_reward_head.safetensors"):
        if not (out / name).is_file():
            raise CheckFailed(f"{out} has no {name}")
    if run.left() < ESTIMATE_S["qlora_merge"]:
        details["merge"] = "not run: out of time budget"
        return details
    run.cli(["axolotl", "merge-lora", str(run.work / "qlora.yml"), "--lora-model-dir", str(out)],
            run.work / "qlora_merge.log")
    import torch
    from transformers import AutoModelForCausalLM

    merged_dir = out / "merged"
    device = "cuda" if run.cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16).to(device).eval()
    ids = tokenizer("12+34=", return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise CheckFailed(f"the merged student {merged_dir} gives non-finite logits")
    details["merge"] = f"{merged_dir} loads and runs (logits {tuple(logits.shape)}, finite)"
    return details


def check_zero3(run: Runner) -> dict:
    config = run.tiny_config("zero3", {
        "deepspeed": str(REPO / "example_configs" / "deepspeed" / "zero3.json"), "bf16": True,
        "sample_packing": False, "pad_to_sequence_len": False, "sequence_len": 64})
    # One process: DeepSpeed reads its rank from the environment (else it tries MPI discovery); nccl serves one GPU.
    port = str(free_port())
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    run.train(config, "zero3", env=env)
    if run.dry_run:
        return {}
    out = Path(config["output_dir"])
    details = {"losses": finite_losses(out, 4)}
    from axolotl_xkd.reward_store import load_reward_head

    head, head_config = load_reward_head(out)
    if not any(p.is_file() for p in out.glob("model*.safetensors")):
        raise CheckFailed(f"{out} has no gathered model*.safetensors")
    details["reward_head"] = {"parameters": sum(p.numel() for p in head.parameters()), "config": head_config}
    return details


def check_cross_tokenizer(run: Runner) -> dict:
    from benchmarks.real_tokenizers import TEXTS, cache_root, load

    try:
        gemma3, llama3 = load("gemma3"), load("llama3")
    except Exception as error:  # no npm and no cache on the GPU machine: say what to carry
        raise CheckFailed(f"the real tokenizers are not in {cache_root()} ({error}); fill it on the CPU machine and "
                          "carry it (benchmarks/gpu_check.sh's header)") from error
    assets = run.work / "assets"
    teacher = build_body(gemma3, assets / "gemma3_teacher", hidden=run.sizes.real_hidden, layers=1, seed=2)
    student = build_body(llama3, assets / "llama3_student", hidden=run.sizes.real_hidden, layers=2, seed=0)
    prompts = ["Repeat the text exactly.", "Copy this line.", "Say it back:"]
    texts = list(TEXTS.values())
    rows = [{"instruction": prompts[n % 3], "input": text if n % 2 else "", "output": text}
            for n, text in enumerate(texts * 2)]
    data = assets / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    config = merged(base_config({"student": student, "tokenizer": student, "teacher": teacher, "data": assets},
                                run.work), {
        "datasets": [{"path": str(data), "ds_type": "json", "type": "alpaca"}],
        "sequence_len": 192, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 2,
        "save_steps": 2, "learning_rate": 1e-4, "bf16": True, **attention(),
        "output_dir": str(run.work / "cross_tokenizer"),
        "dataset_prepared_path": str(run.work / "prepared" / "cross_tokenizer"),
        "xkd": {"teacher": {"source": "model", "path": str(teacher), "cross_tokenizer": True,
                            "dtype": "bfloat16"}}})
    logs = run.train(config, "cross_tokenizer")
    if run.dry_run:
        return {}
    sizes, coverage = VOCAB_RE.search(logs), COVERAGE_RE.search(logs)
    if not sizes or (int(sizes[1]), int(sizes[2])) != (len(llama3), len(gemma3)):
        raise CheckFailed(f"no vocabulary line naming {len(llama3)} and {len(gemma3)} tokens in {run.work}/"
                          "cross_tokenizer.log")
    if not coverage or int(coverage[2]) == 0 or int(coverage[1]) < 0.9 * int(coverage[2]):
        raise CheckFailed(f"coverage line missing or under 90%: {coverage and coverage[0]}")
    out = Path(config["output_dir"])
    logged = [e for e in losses(out) if "loss" in e]
    if len(logged) != 2 or not all(math.isfinite(e["loss"]) and e["xkd/distill"] > 0 for e in logged):
        raise CheckFailed(f"expected 2 finite losses with xkd/distill > 0: {logged}")
    return {"vocabularies": sizes[0], "coverage": coverage[0], "losses": [e["loss"] for e in logged]}


def check_mixture(run: Runner) -> dict:
    config = run.tiny_config("mixture", {"bf16": True, **attention()})
    entry = config["datasets"][0]
    config["datasets"] = [{**entry, "xkd_teacher": "a"}, {**entry, "xkd_teacher": "b"}]  # packed rows of both
    teacher = config["xkd"].pop("teacher")
    config["xkd"].update(mixture="route", teachers=[{**teacher, "name": name, "dtype": "bfloat16"} for name in "ab"])
    run.train(config, "mixture")
    if run.dry_run:
        return {}
    logged = [e for e in losses(Path(config["output_dir"])) if "loss" in e]
    if len(logged) != 4 or not all(math.isfinite(e["loss"]) for e in logged):
        raise CheckFailed(f"expected 4 finite losses: {logged}")
    shares = [(e["xkd/teacher/a/share"], e["xkd/teacher/b/share"]) for e in logged]
    if not all(a > 0 and b > 0 and abs(a + b - 1) < 1e-3 for a, b in shares):
        raise CheckFailed(f"both teachers must serve positions at every step, their shares summing to 1: {shares}")
    return {"losses": [e["loss"] for e in logged], "shares": shares}


def throughput_data(run: Runner, student_tokenizer, teacher: Path, folder: Path) -> tuple[Path, Path]:
    """The same rows in the two formats: KD v2 for X-KD (input_ids, labels, target_token_ids, logprobs; entry i is
    the teacher's distribution over token i+1, every position filled) and the KD plugin's pre-tokenized columns
    (input_ids, attention_mask, labels, target_token_ids, target_logprobs, target_mask; target_mask[i] set where
    token i+1 is a response token, the pairing X-KD uses). Random token ids (no text is needed); the teacher's
    top-k from a forward pass of a random body of the same tokenizer."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    xkd_path, kd_path = folder / "kd_v2.parquet", folder / "kd_plugin.parquet"
    if xkd_path.is_file() and kd_path.is_file():
        return xkd_path, kd_path
    s = run.sizes
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype).to(device).eval()
    rng = np.random.default_rng(0)
    special = set(student_tokenizer.all_special_ids)
    low = max(special) + 1 if max(special) < 1000 else 1000
    high = min(len(student_tokenizer), model.config.vocab_size) - 300  # Llama 3's reserved tokens sit at the end
    xkd_rows = {"input_ids": [], "labels": [], "target_token_ids": [], "logprobs": []}
    kd_rows = {"input_ids": [], "attention_mask": [], "labels": [], "target_token_ids": [], "target_logprobs": [],
               "target_mask": []}
    for _ in range(s.bench_rows):
        n = int(rng.integers(s.bench_len[0], s.bench_len[1] + 1))
        ids = [student_tokenizer.bos_token_id, *rng.integers(low, high, n - 2).tolist(), student_tokenizer.eos_token_id]
        labels = [-100] * s.bench_prompt + ids[s.bench_prompt:]
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=device)).logits[0].float()
        top = torch.log_softmax(logits, dim=-1).topk(s.bench_top_k, dim=-1)
        top_ids, top_lps = top.indices.cpu().tolist(), top.values.cpu().tolist()
        mask = [[int(i + 1 < n and labels[i + 1] != -100)] * s.bench_top_k for i in range(n)]
        xkd_rows["input_ids"].append(ids)
        xkd_rows["labels"].append(labels)
        xkd_rows["target_token_ids"].append(top_ids)
        xkd_rows["logprobs"].append(top_lps)
        kd_rows["input_ids"].append(ids)
        kd_rows["attention_mask"].append([1] * n)
        kd_rows["labels"].append(labels)
        kd_rows["target_token_ids"].append(top_ids)
        kd_rows["target_logprobs"].append(top_lps)
        kd_rows["target_mask"].append(mask)
    folder.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(xkd_rows).to_parquet(str(xkd_path))
    Dataset.from_dict(kd_rows).to_parquet(str(kd_path))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the training processes get the GPU's memory
    return xkd_path, kd_path


def check_throughput(run: Runner) -> dict:
    from benchmarks.real_tokenizers import cache_root, load

    try:
        llama3 = load("llama3")
    except Exception as error:
        raise CheckFailed(f"the Llama 3 tokenizer is not in {cache_root()} ({error})") from error
    s = run.sizes
    assets = run.work / "assets"
    student = build_body(llama3, assets / "bench_student", hidden=s.bench_hidden, layers=s.bench_layers, seed=5)
    teacher = build_body(llama3, assets / "bench_teacher", hidden=s.bench_hidden, layers=s.bench_layers, seed=6)
    xkd_data, kd_data = throughput_data(run, llama3, teacher, assets / "bench_data")
    if run.dry_run:
        from datasets import load_dataset

        from axolotl_xkd.store.format import validate_rows
        from axolotl_xkd.store.read import _read_any, from_axolotl_kd_v2

        table, k = from_axolotl_kd_v2(_read_any(str(xkd_data)), path=str(xkd_data), top_k=None)
        validate_rows(table, top_k=k, vocab_size=len(llama3), where=str(xkd_data))
        columns = load_dataset("parquet", data_files=str(kd_data), split="train").column_names
        assert set(columns) == {"input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs",
                                "target_mask"}, columns
    common = {
        # bf16 on the GPU; on a CPU (--allow-cpu) float32, since the KD plugin has no bf16 on a CPU (X-KD has)
        "base_model": str(student), "tokenizer_config": str(student), "bf16": run.cuda, **attention(),
        "sample_packing": True, "pad_to_sequence_len": True, "sequence_len": s.bench_sequence_len,
        "micro_batch_size": 2, "gradient_accumulation_steps": 1, "num_epochs": 1, "max_steps": s.bench_steps,
        "logging_steps": 1, "save_steps": s.bench_steps, "learning_rate": 1e-5, "optimizer": "adamw_torch",
        "lr_scheduler": "constant", "warmup_steps": 0, "seed": 42, "val_set_size": 0, "train_on_inputs": False,
        "datasets": [{"path": str(kd_data), "ds_type": "parquet"}], "save_safetensors": True, "report_to": "none",
        "dataloader_num_workers": 0, "gradient_checkpointing": False, "include_tkps": True,
    }
    arms = {
        "xkd": {"plugins": ["axolotl_xkd.XKDPlugin", TIMING_PLUGIN],
                "xkd": {"teacher": {"source": "precomputed", "path": str(xkd_data), "format": "axolotl_kd_v2"},
                        "divergence": "forward_kl", "temperature": 1.0, "alpha_kd": 1.0, "alpha_ce": 0.0}},
        "kd_plugin": {"plugins": ["axolotl.integrations.kd.KDPlugin", TIMING_PLUGIN], "kd_trainer": True,
                      "kd_alpha": 1.0, "kd_ce_alpha": 0.0, "kd_temperature": 1.0},
    }
    got = {}
    for name, over in arms.items():
        config = {**common, **over, "output_dir": str(run.work / f"throughput_{name}"),
                  "dataset_prepared_path": str(run.work / "prepared" / f"throughput_{name}")}
        run.train(config, f"throughput_{name}")
        if run.dry_run:
            continue
        out = Path(config["output_dir"])
        history = losses(out)
        logged = [e for e in history if "loss" in e]
        if len(logged) != s.bench_steps or not all(math.isfinite(e["loss"]) for e in logged):
            raise CheckFailed(f"{name}: expected {s.bench_steps} finite losses, got {[e['loss'] for e in logged]}")
        timing = json.loads((out / "step_times.json").read_text())
        intervals, summary = timing["step_seconds"], timing["summary"]
        steps = intervals[min(2, len(intervals) - 1):]  # the first two steps warm up (kernels, allocator)
        rates = [e["tokens/train_per_sec_per_gpu"] for e in logged[2:] if e.get("tokens/train_per_sec_per_gpu")]
        got[name] = {"median_step_s": statistics.median(steps), "steps_timed": len(steps),
                     "train_samples_per_second": summary.get("train_samples_per_second"),
                     "train_runtime": summary.get("train_runtime"),
                     "tokens_train_per_sec_per_gpu": statistics.median(rates) if rates else None,
                     "first_loss": logged[0]["loss"], "last_loss": logged[-1]["loss"]}
    if run.dry_run:
        return {}
    xkd, kd = got["xkd"], got["kd_plugin"]
    details = {**got, "attention": common["attn_implementation"],
               "shape": {"vocab": len(llama3), "hidden": s.bench_hidden, "layers": s.bench_layers,
                         "rows": s.bench_rows, "sequence_len": s.bench_sequence_len, "micro_batch_size": 2,
                         "top_k": s.bench_top_k, "steps": s.bench_steps},
               "speed_ratio_note": "X-KD's speed over the KD plugin's (> 1: X-KD faster)",
               "speed_ratio_step_time": kd["median_step_s"] / xkd["median_step_s"]}
    if xkd["train_samples_per_second"] and kd["train_samples_per_second"]:
        details["speed_ratio_samples_per_second"] = xkd["train_samples_per_second"] / kd["train_samples_per_second"]
    return details


FUNCTIONS = {"flash_packing": check_flash_packing, "qlora": check_qlora, "zero3": check_zero3,
             "cross_tokenizer": check_cross_tokenizer, "mixture": check_mixture, "throughput": check_throughput}


def environment() -> dict:
    info = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "axolotl", "deepspeed", "bitsandbytes", "flash_attn", "peft", "trl"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except Exception as error:  # noqa: BLE001 - record what is missing, whatever the reason
            info[name] = f"missing ({type(error).__name__})"
    import torch

    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return info


def copy_out(work: Path, to: str | None, result: Result | None) -> None:
    """Copy gpu_check.json (and a failed check's logs, at most 6 files in all) to `to` after every check, so that a
    device call cut off at its time limit still brings back what was measured."""
    if not to:
        return
    folder = Path(to)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "gpu_check.json", folder / "gpu_check.json")
    if result is not None and result.status == "fail":
        for log in sorted(work.glob(f"{result.name}*.log")):
            if len(list(folder.glob("*.log"))) < 6:
                shutil.copy(log, folder / log.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/gpu_check", help="work folder (default runs/gpu_check)")
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    parser.add_argument("--budget-s", type=float, default=float(os.environ.get("XKD_GPU_BUDGET_S", "480")),
                        help="no check starts once its estimate no longer fits (default 480, $XKD_GPU_BUDGET_S)")
    parser.add_argument("--dry-run", action="store_true", help="write and validate the configs, train nothing")
    parser.add_argument("--small", action="store_true", help="the dry run's small assets (a CPU can train them)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="train without CUDA (with --small: cross_tokenizer and throughput run on a CPU)")
    parser.add_argument("--copy-to", default=os.environ.get("OUT"),
                        help="also copy gpu_check.json and failed checks' logs here after each check (default $OUT)")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    run = Runner(work, args.budget_s, args.dry_run, args.small)
    if not (args.dry_run or args.allow_cpu or run.cuda):
        print("gpu_check: no CUDA device; run with --dry-run on a machine without one", file=sys.stderr)
        return 2
    report = {"mode": "dry-run" if args.dry_run else ("gpu" if run.cuda else "cpu"), "sizes": asdict(run.sizes),
              "environment": environment(), "checks": {}}
    results = []
    for name in args.checks:
        begin = time.monotonic()
        result = Result(name)
        if not args.dry_run and run.left() < ESTIMATE_S[name]:
            result.status, result.reason = "skip", f"out of time budget ({run.left():.0f} s left of {args.budget_s})"
        else:
            try:
                result.details = FUNCTIONS[name](run)
                result.status = "pass"
            except Skip as why:
                result.status, result.reason = "skip", str(why)
            except CheckFailed as why:
                result.reason = str(why)
            except Exception:  # noqa: BLE001 - a broken check is a failed check; the next one still runs
                result.reason = traceback.format_exc()[-4000:]
        result.seconds = round(time.monotonic() - begin, 1)
        results.append(result)
        report["checks"][name] = {"status": result.status, "seconds": result.seconds, "reason": result.reason,
                                  **result.details}
        (work / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        copy_out(work, args.copy_to, result)
        first = result.reason.strip().splitlines()[0] if result.reason.strip() else ""
        print(f"gpu_check: {name} {result.status.upper()} ({result.seconds:.0f} s) {first}", flush=True)
        if result.status == "fail":
            print(result.reason, file=sys.stderr, flush=True)
    if args.dry_run:
        report["validated_configs"] = run.validated
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    report["summary"] = counts
    report["seconds"] = round(time.monotonic() - run.start, 1)
    (work / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    copy_out(work, args.copy_to, None)
    print(f"gpu_check: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped "
          f"({report['seconds']:.0f} s); {work / 'gpu_check.json'}")
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
