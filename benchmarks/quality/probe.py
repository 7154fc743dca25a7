"""The quick measurements that chose arithmetic_v2 (docs/arithmetic_v2.md), outside axolotl, in plain PyTorch.

    python -m benchmarks.quality.probe VARIANT [--student-hidden 64] [--steps 150]
        [--seeds 1 2 3 4] [--teacher-steps 0] [--lr 3e-3]

Trains a tiny student with `axolotl_xkd.tiny.train_teacher` (plain supervised AdamW, batch 32: an estimate of
the study's SFT arm at the same budget) and, with --teacher-steps > 0, the study's teacher (hidden 128, batch
64), then prints greedy exact match on 100 held-out prompts as one JSON line. The splits are drawn as
Task("arithmetic", VARIANT).splits(2000, 100, seed=0), so the held-out prompts differ from the study's
arithmetic_v2 split (which is drawn under its own task name).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from axolotl_xkd.tiny import build_model, build_tokenizer, train_teacher
from benchmarks.quality.evaluation import generate
from benchmarks.quality.tasks import Task, arithmetic, arithmetic_v2, exact_match


def _signed(rng: random.Random, high: int = 9, *, mod: int = 0, positive: bool = False):
    """a, op1, b, a op1 b, op2, c, result. Draw order as in the measurements: a, b, c, op1, op2 (positive: a, op1,
    b, op2, c, with b and c small enough that no number is negative)."""
    if positive:
        a = rng.randint(0, high)
        f = rng.choice("+-")
        b = rng.randint(0, high if f == "+" else a)
        i = a + b if f == "+" else a - b
        s = rng.choice("+-")
        c = rng.randint(0, high if s == "+" else min(i, high))
    else:
        a, b, c = (rng.randint(0, high) for _ in range(3))
        f, s = rng.choice("+-"), rng.choice("+-")
        i = a + b if f == "+" else a - b
    i = i % mod if mod else i
    r = i + c if s == "+" else i - c
    return a, f, b, i, s, c, (r % mod if mod else r)


def addsub(rng, **kw):  # '5-2+9=' -> '5-2=3,3+9=12'
    a, f, b, i, s, c, r = _signed(rng, **kw)
    return {"prompt": f"{a}{f}{b}{s}{c}=", "response": f"{a}{f}{b}={i},{i}{s}{c}={r}"}


def reduce_addsub(rng):  # '5-2+9=' -> '3+9=12'
    a, f, b, i, s, c, r = _signed(rng)
    return {"prompt": f"{a}{f}{b}{s}{c}=", "response": f"{i}{s}{c}={r}"}


def short_addsub(rng):  # '5-2+9=' -> '3=12'
    a, f, b, i, s, c, r = _signed(rng)
    return {"prompt": f"{a}{f}{b}{s}{c}=", "response": f"{i}={r}"}


def addonly(rng, *, width: int = 0, reduce: bool = False):  # '3+4+9=' -> '3+4=7,7+9=16'
    a, b, c = (rng.randint(0, 9) for _ in range(3))
    i, r = f"{a + b:0{width}d}" if width else str(a + b), f"{a + b + c:0{width}d}" if width else str(a + b + c)
    return {"prompt": f"{a}+{b}+{c}=", "response": (f"{i}+{c}={r}" if reduce else f"{a}+{b}={i},{i}+{c}={r}")}


VARIANTS = {
    "orig": arithmetic,  # the study's first task: + - * with precedence
    "addsub": addsub,
    "addmod": lambda rng: addsub(rng, mod=10),  # every number mod 10
    "addsub_small": lambda rng: addsub(rng, high=5),  # digits 0-5
    "pos_addsub": lambda rng: addsub(rng, positive=True),  # no negative numbers
    "reduce_addsub": reduce_addsub,
    "short_addsub": short_addsub,
    "addonly": addonly,
    "reduce_addonly": lambda rng: addonly(rng, reduce=True),
    "fixed_addonly": arithmetic_v2,  # the chosen one: two-digit worked steps
    "fixed_reduce_addonly": lambda rng: addonly(rng, width=2, reduce=True),
}


def score(model, tokenizer, rows) -> float:
    greedy = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=32, max_length=48)
    return exact_match(greedy, [r["response"] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=list(VARIANTS))
    parser.add_argument("--student-hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--teacher-steps", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, held_out = Task("arithmetic", VARIANTS[args.variant], exact_match, "accuracy").splits(2000, 100, seed=0)
    tokenizer = build_tokenizer()
    out: dict = {"variant": args.variant, "student_hidden": args.student_hidden, "steps": args.steps, "lr": args.lr}
    if args.teacher_steps:
        teacher = build_model(tokenizer, hidden=128, layers=2, seed=0)
        started = time.perf_counter()
        train_teacher(teacher, tokenizer, train, steps=args.teacher_steps, seed=0)
        out.update(teacher_seconds=round(time.perf_counter() - started), teacher=score(teacher, tokenizer, held_out))
    scores = []
    for seed in args.seeds:
        student = build_model(tokenizer, hidden=args.student_hidden, layers=2, seed=seed)
        train_teacher(student, tokenizer, train, steps=args.steps, seed=seed, batch_size=32, lr=args.lr)
        scores.append(score(student, tokenizer, held_out))
    out.update(student_parameters=sum(p.numel() for p in student.parameters()), sft=scores,
               sft_mean=statistics.fmean(scores))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
