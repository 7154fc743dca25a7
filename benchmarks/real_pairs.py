"""Cross-tokenizer pairs of real tokenizers (benchmarks/real_tokenizers.py): per (student, teacher) pair, both
vocabulary sizes, the teacher tokens with a student twin, the share of response positions that get a teacher
distribution and the share aligned (both prefixes end at the same byte), and the alignment's and projection's time
per 1,000 student tokens, on Alpaca rows whose input and response are the real texts of TEXTS.

    python -m benchmarks.real_pairs [--out benchmarks/results/real_pairs.md] [--repeats 3]

The teacher is a random distribution over its whole vocabulary at every position (the projection's cost does not
depend on the values); times are the minimum over repeats, one thread, after one warm-up.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

from axolotl_xkd.cross_tokenizer import Aligner, path_rows, project
from benchmarks.real_tokenizers import ALPACA, FAMILIES, TEXTS, load

ROOT = Path(__file__).resolve().parent


def rows(student) -> list[tuple[list[int], int]]:
    """(ids, index of the first response token) of one Alpaca row per text, EOS appended."""
    out = []
    for text in TEXTS.values():
        prompt = ALPACA.replace("slate ivory coral", text)
        first = len(student(prompt)["input_ids"])
        out.append((student(prompt + text)["input_ids"] + [student.eos_token_id], first))
    return out


def measure(student_name: str, teacher_name: str, repeats: int) -> dict:
    """One pair's row of the table."""
    student, teacher = load(student_name), load(teacher_name)
    start = time.perf_counter()
    aligner = Aligner(student, teacher, f"{teacher_name} into {student_name}")
    build = time.perf_counter() - start
    data = rows(student)
    counted = covered = aligned = tokens = 0
    best, softmax = float("inf"), 1.0
    g = torch.Generator().manual_seed(0)
    for repeat in range(repeats + 1):
        spent = baseline = 0.0
        for ids, first in data:
            start = time.perf_counter()
            segment = aligner.segment(ids, "row")
            spent += time.perf_counter() - start
            positions = len(segment.teacher_positions) + len(path_rows([segment]))
            logits = torch.randn(positions, aligner.vocab.teacher_size, generator=g)
            start = time.perf_counter()
            lp = torch.log_softmax(logits, -1)
            baseline += time.perf_counter() - start
            actions = torch.tensor([ids[i + 1] if i + 1 < len(ids) else -1 for i in segment.student_positions])
            start = time.perf_counter()
            project([segment], None, lp, actions, aligner.projection, top_k=64)
            spent += time.perf_counter() - start
            if repeat == 0:
                response = set(range(first - 1, len(ids) - 1))
                kept = dict(zip(segment.student_positions, segment.written))
                counted += len(response)
                covered += sum(i in kept for i in response)
                aligned += sum(kept.get(i, 1) == 0 for i in response)
                tokens += len(ids)
        if repeat and spent < best:
            best, softmax = spent, baseline
    return {"student": student_name, "teacher": teacher_name, "student_vocab": aligner.vocab.student_size,
            "teacher_vocab": aligner.vocab.teacher_size, "twins": aligner.vocab.exact,
            "covered": covered / counted, "aligned": aligned / counted, "tokens": tokens,
            "ms_per_1k": 1000.0 * best / tokens * 1000.0, "ratio": best / softmax, "build_s": build}


def table(results: list[dict], command: str) -> str:
    lines = [
        "# Real tokenizer pairs: vocabularies, coverage and projection time", "",
        f"`{command}` ({torch.get_num_threads()} thread, {len(TEXTS)} Alpaca rows of real text per student; the "
        "teacher a random distribution over its whole vocabulary). Covered: response positions (the first response "
        "token to EOS) that get a teacher distribution; aligned: of those, where both prefixes end at the same "
        "byte. Time: `Aligner.segment` plus `project` per 1,000 student tokens (the repeat with the least); x "
        "log-softmax: that time over the time of the teacher's own log-softmax over its vocabulary at the same "
        "positions in the same repeat (work every teacher does); build: reading both tokenizers once.", "",
        "| student | teacher | |V_S| | |V_T| | teacher tokens with a twin | covered | aligned | ms / 1k tokens | "
        "x log-softmax | build s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['student']} | {r['teacher']} | {r['student_vocab']} | {r['teacher_vocab']} | "
                     f"{r['twins']} ({100 * r['twins'] / r['teacher_vocab']:.1f}%) | {100 * r['covered']:.1f}% | "
                     f"{100 * r['aligned']:.1f}% | {r['ms_per_1k']:.0f} | {r['ratio']:.2f} | {r['build_s']:.1f} |")
    families = ", ".join(f"{name}: {family.kind}" for name, family in FAMILIES.items())
    return "\n".join([*lines, "", f"Families: {families}.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "real_pairs.md")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [measure(s, t, args.repeats) for s, t in itertools.permutations(FAMILIES, 2)]
    command = "python -m benchmarks.real_pairs " + " ".join(sys.argv[1:])
    args.out.write_text(table(results, command.strip()))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
