"""Fwd+bwd time and peak memory of the chunked X-KD loss against its floor and its neighbours,
to show what chunking saves.

Not a test. Variants, all at the same chunk size and in the same run:
  ce_floor            one output layer + cross-entropy, chunked, gradients in place (the floor)
  xkd_dense[_c]       chunked_xkd_loss, full-vocabulary teacher given as hidden states + output layer
  xkd_topk[_c]        chunked_xkd_loss, top-k (k=64) + tail teacher
  xkd_unchunked       xkd_loss on full student and teacher logits (the reference path)
  liger_jsd[_c]       Liger's LigerFusedLinearJSDLoss
(_c: under torch.compile.) X-KD runs with every term on: distillation, CE (alpha_ce=0.5), reward KL, TD.

Each variant runs in two processes of its own; each builds the inputs and runs one warm-up step
(which also compiles). The first times `--repeats` fwd+bwd steps (median) with the default
allocator. The second takes its baseline, resets the peak (CPU: /proc/self/clear_refs 5 resets
VmHWM; CUDA: reset_peak_memory_stats) and runs one step; peak memory is the high-water mark above
the baseline (CPU: resident set, with glibc's mmap threshold pinned at 1 MiB so freed tensors leave
it, which slows allocation and is why it is not the timed process; CUDA: max_memory_allocated).

    python -m benchmarks.loss_memory                    # CPU, N=2048, H=512, V=32000 and 128256, fp32
    python -m benchmarks.loss_memory --device cuda      # N=8192, H=4096, V=128256, bf16 (needs CUDA)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from axolotl_xkd.losses import Q_FORMS, DenseSignal, TopKSignal, XKDHyperparams, xkd_loss
from axolotl_xkd.losses.chunked import chunked_xkd_loss
from axolotl_xkd.losses.blocks import logsumexp_rows
from axolotl_xkd.losses.signal import DenseHiddenSignal

VARIANTS = (
    "ce_floor",
    "xkd_dense",
    "xkd_topk",
    "xkd_unchunked",
    "liger_jsd",
    "liger_jsd_c",
)
TOP_K = 64
# Forward KL, the default q_form, every term on in the spec's coupled form (the TD term on the student's Q).
PARAMS = XKDHyperparams(alpha_ce=0.5, td_target="observed", reward_kl_weight=1.0, td_weight=1.0)
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "loss_memory.md"


class ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of CE over valid positions through the output layer, chunked, gradients written in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):  # noqa: D102
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows, tgt = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            valid = tgt != -100
            safe = torch.where(valid, tgt, 0).unsqueeze(-1)
            logits = (rows @ weight.T).float()
            lse = logsumexp_rows(logits).unsqueeze(-1)  # in row blocks, as the X-KD kernel does
            total += torch.where(valid, (lse - logits.gather(-1, safe)).squeeze(-1), 0.0).sum()
            probs = logits.sub_(lse).exp_()  # softmax in place: d CE / d logits = softmax - one_hot
            probs.scatter_add_(-1, safe, torch.full_like(safe, -1.0, dtype=probs.dtype))
            probs.mul_(valid.unsqueeze(-1))
            probs = probs.to(weight.dtype)
            grad_hidden[start : start + chunk_size] = probs @ weight
            grad_weight.addmm_(probs.T, rows)
            logits = probs = None  # free the chunk's (C, V) buffer before the next matmul
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.to(grad_hidden.dtype)
        return grad_hidden * scale, grad_weight * scale, None, None


def build_inputs(n_tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: str) -> dict:
    """Student/teacher hidden states and output layers, labels with a masked prompt, reward-head outputs, top-k."""
    g = torch.Generator(device=device).manual_seed(0)
    rows = 2
    t = n_tokens // rows

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x = {
        "hidden": randn(rows, t, hidden).requires_grad_(True),
        "weight": randn(vocab, hidden, scale=hidden**-0.5 * 4).requires_grad_(True),
        "teacher_hidden": randn(rows, t, hidden),
        "teacher_weight": randn(vocab, hidden, scale=hidden**-0.5 * 4),
        "mean": torch.zeros(rows, t, device=device, requires_grad=True),
        "log_std": torch.zeros(rows, t, device=device, requires_grad=True),
    }
    labels = torch.randint(0, vocab, (rows, t), generator=g, device=device)
    labels[:, : t // 8] = -100  # prompts
    x["labels"] = labels
    ids, lps = [], []
    with torch.no_grad():
        flat_h, tw = x["teacher_hidden"].reshape(n_tokens, hidden), x["teacher_weight"]
        for start in range(0, n_tokens, 512):  # top-k built chunk-wise, so the build itself stays small
            top = torch.log_softmax((flat_h[start : start + 512] @ tw.T).float(), -1).topk(TOP_K, dim=-1)
            ids.append(top.indices)
            lps.append(top.values)
    x["topk"] = TopKSignal(torch.cat(ids).view(rows, t, TOP_K), torch.cat(lps).view(rows, t, TOP_K))
    return x


def make_step(variant: str, x: dict, chunk: int, params: XKDHyperparams = PARAMS):
    """A closure running one fwd+bwd of `variant` with the X-KD `params`; returns the loss value."""
    hidden, weight, labels = x["hidden"], x["weight"], x["labels"]
    leaves = [hidden, weight, x["mean"], x["log_std"]]
    compiled = variant.endswith("_c")
    reward = {"mu": x["mean"], "log_sigma": x["log_std"]}

    def backward(loss: torch.Tensor) -> float:
        loss.backward()
        for leaf in leaves:
            leaf.grad = None
        return loss.item()

    if variant == "ce_floor":
        targets = torch.full_like(labels, -100)
        targets[:, :-1] = labels[:, 1:]
        flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        return lambda: backward(ChunkedCrossEntropy.apply(flat_h, weight, flat_t, chunk))
    if variant.startswith("xkd_dense") or variant.startswith("xkd_topk"):
        teacher = (
            DenseHiddenSignal(x["teacher_hidden"], x["teacher_weight"]) if "dense" in variant else x["topk"]
        )
        return lambda: backward(
            chunked_xkd_loss(hidden, weight, labels, teacher=teacher, params=params, chunk_size=chunk,
                             **reward).loss
        )
    if variant == "xkd_unchunked":

        def unchunked() -> float:
            with torch.no_grad():
                teacher = DenseSignal(x["teacher_hidden"] @ x["teacher_weight"].T)
            return backward(xkd_loss(hidden @ weight.T, labels, teacher=teacher, params=params, **reward).loss)

        return unchunked
    if variant.startswith("liger_jsd"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(compiled=compiled, chunk_size=chunk)
        targets = torch.full_like(labels, -100)
        targets[:, :-1] = labels[:, 1:]
        flat = hidden.reshape(-1, hidden.shape[-1])
        t_flat = x["teacher_hidden"].reshape(-1, hidden.shape[-1])
        return lambda: backward(loss_fn(flat, weight, t_flat, x["teacher_weight"], targets.reshape(-1)))
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def _rss_mb() -> tuple[float, float]:
    status = dict(re.findall(r"(Vm\w+):\s+(\d+)", Path("/proc/self/status").read_text()))
    return int(status["VmRSS"]) / 1024, int(status["VmHWM"]) / 1024


def worker(args: argparse.Namespace) -> None:
    """Measure one variant in this process and print a JSON line."""
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = build_inputs(args.tokens, args.hidden, args.vocab, dtype, device)
    step = make_step(args.worker, x, args.chunk, replace(PARAMS, q_form=args.q_form))
    loss = step()  # warm-up (and compile)
    if args.measure == "time":
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            loss = step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        print(json.dumps({"variant": args.worker, "time_s": statistics.median(times), "loss": loss}))
        return
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_mb()[0]
        Path("/proc/self/clear_refs").write_text("5")
    loss = step()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else _rss_mb()[1] - base
    print(json.dumps({"variant": args.worker, "peak_mb": peak, "loss": loss}))


def run_variant(args: argparse.Namespace, variant: str, vocab: int) -> dict:
    """Time and peak memory of `variant`, each measured in a fresh process of its own."""
    cmd = [sys.executable, "-m", "benchmarks.loss_memory", "--worker", variant, "--vocab", str(vocab),
           "--device", args.device, "--tokens", str(args.tokens), "--hidden", str(args.hidden),
           "--chunk", str(args.chunk), "--repeats", str(args.repeats), "--q-form", args.q_form]
    # Time runs with the default allocator, as training does. Memory: every allocation of 1 MiB or more
    # is mmapped and unmapped when freed, so the resident set follows the live tensors (glibc would
    # otherwise keep freed blocks); that costs a page fault per allocation, so it is not timed.
    result = {"variant": variant}
    for measure, env in (("time", dict(os.environ)), ("memory", {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)})):
        proc = subprocess.run([*cmd, "--measure", measure], capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            return {"variant": variant, "error": tail[0]}
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return result


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    name = model.group(1) if model else platform.processor()
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def table(rows: list[dict]) -> list[str]:
    floor = next((r for r in rows if r["variant"] == "ce_floor" and "error" not in r), None)
    lines = [
        "| variant | time (s) | peak (MB) | time / floor | memory / floor | loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | |")
            continue
        ratio_t = f"{r['time_s'] / floor['time_s']:.2f}x" if floor else "-"
        ratio_m = f"{r['peak_mb'] / floor['peak_mb']:.2f}x" if floor else "-"
        lines.append(
            f"| {r['variant']} | {r['time_s']:.3f} | {r['peak_mb']:.0f} | {ratio_t} | {ratio_m} | {r['loss']:.6g} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--vocab", type=int, nargs="+", help="default: 32000 128256 (cpu), 128256 (cuda)")
    parser.add_argument("--tokens", type=int, help="default: 2048 (cpu), 8192 (cuda)")
    parser.add_argument("--hidden", type=int, help="default: 512 (cpu), 4096 (cuda)")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--q-form", choices=Q_FORMS, default=PARAMS.q_form, help="X-KD's Q form (default: the default)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="Markdown file the table is appended to")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("time", "memory"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.tokens = args.tokens or (8192 if cuda else 2048)
    args.hidden = args.hidden or (4096 if cuda else 512)
    if args.worker:
        args.vocab = args.vocab[0]
        worker(args)
        return
    if cuda and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here; nothing to run.")
        return
    vocabs = args.vocab or ([128256] if cuda else [32000, 128256])
    command = "python -m benchmarks.loss_memory " + " ".join(sys.argv[1:])
    report = [
        f"## {datetime.datetime.now().isoformat(timespec='seconds')}: {args.device}",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine()}, torch {torch.__version__}  ",
        f"N={args.tokens} tokens, H={args.hidden}, {'bf16' if cuda else 'fp32'}, chunks of {args.chunk}, "
        f"median of {args.repeats} fwd+bwd steps after one warm-up; X-KD: {replace(PARAMS, q_form=args.q_form)}",
        "",
    ]
    for vocab in vocabs:
        rows = []
        for variant in args.variants:
            rows.append(run_variant(args, variant, vocab))
            print(f"V={vocab} {json.dumps(rows[-1])}", flush=True)
        report += [f"### V={vocab}", "", *table(rows), ""]
        print("\n".join(table(rows)), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write("\n".join(report) + "\n")
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
