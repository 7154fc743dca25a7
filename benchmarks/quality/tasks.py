"""The study's three generated tasks, in the spirit of the paper's (GSM8K, WMT14, XSum), over the tiny
character tokenizer: multi-step arithmetic with a worked answer (exact match of the final number), a
rule-based translation between two made-up languages (BLEU, sacrebleu) and a compression task (ROUGE-L,
rouge-score). Every row is a {"prompt", "response"} pair; prompts of the eval split never occur in training.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

Row = dict[str, str]

# Made-up languages: each source word has one target word; the target sentence is in reverse order.
LEXICON = {"ba": "dok", "ke": "lum", "mi": "zar", "tu": "pif", "so": "gen", "ra": "wex", "ni": "hol", "fe": "qib",
           "lo": "tav", "zu": "yom", "pa": "cel", "di": "rus"}
ENTITIES = ["Ana", "Bo", "Cyd", "Dex", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu"]
FILLER = ["the", "saw", "met", "and", "at", "by", "old", "a", "red", "ran", "to", "big"]


def arithmetic(rng: random.Random) -> Row:
    """Two operations on single digits, worked step by step: '3+4*2=' -> '4*2=8,3+8=11'."""
    a, b, c = (rng.randint(0, 9) for _ in range(3))
    first, second = rng.choice("+-*"), rng.choice("+-*")
    apply = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
    if second == "*" and first != "*":  # precedence: b*c first
        inner = apply["*"](b, c)
        steps = f"{b}*{c}={inner},{a}{first}{inner}={apply[first](a, inner)}"
    else:
        inner = apply[first](a, b)
        steps = f"{a}{first}{b}={inner},{inner}{second}{c}={apply[second](inner, c)}"
    return {"prompt": f"{a}{first}{b}{second}{c}=", "response": steps}


def arithmetic_v2(rng: random.Random) -> Row:
    """Two additions of single digits, worked step by step with two-digit numbers: '3+4+9=' -> '3+4=07,07+9=16'.

    The learnable variant (docs/arithmetic_v2.md): the first task's products (up to 729) and signs kept every
    student at 0-6% in the study's 150 steps; here the teacher reaches about 90% and plain SFT about 30%.
    """
    a, b, c = (rng.randint(0, 9) for _ in range(3))
    return {"prompt": f"{a}+{b}+{c}=", "response": f"{a}+{b}={a + b:02d},{a + b:02d}+{c}={a + b + c:02d}"}


def arithmetic_sub(rng: random.Random) -> Row:
    """arithmetic_v2's worked format with a subtraction second: '3+4-2=' -> '3+4=07,07-2=05' (c <= a+b, so no number
    is negative)."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    c = rng.randint(0, min(9, a + b))
    return {"prompt": f"{a}+{b}-{c}=", "response": f"{a}+{b}={a + b:02d},{a + b:02d}-{c}={a + b - c:02d}"}


def arithmetic_split(rng: random.Random) -> Row:
    """Half arithmetic_v2 rows, half arithmetic_sub rows, each with a `teacher` field naming its half ("add" or
    "sub"): the task of two specialists that each know half (benchmarks/quality/specialists.py, issue 34)."""
    if rng.random() < 0.5:
        return {**arithmetic_v2(rng), "teacher": "add"}
    return {**arithmetic_sub(rng), "teacher": "sub"}


def translation(rng: random.Random) -> Row:
    """2-4 source words -> their target words in reverse order: 'ba ke:' -> 'lum dok'."""
    words = [rng.choice(list(LEXICON)) for _ in range(rng.randint(2, 4))]
    return {"prompt": " ".join(words) + ":", "response": " ".join(LEXICON[w] for w in reversed(words))}


def summary(rng: random.Random) -> Row:
    """A 6-8 word sentence with two or three named entities -> the entities, in order: 'the Ana met Bo' -> 'Ana Bo'."""
    names = rng.sample(ENTITIES, rng.randint(2, 3))
    words = [rng.choice(FILLER) for _ in range(rng.randint(6, 8) - len(names))]
    for name in names:
        words.insert(rng.randint(0, len(words)), name)
    ordered = [w for w in words if w in names]
    return {"prompt": " ".join(words) + ":", "response": " ".join(ordered)}


def final_number(text: str) -> str:
    return text.rsplit("=", 1)[-1].strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions whose final number (after the last '=') equals the reference's, in percent."""
    return 100.0 * sum(final_number(p) == final_number(r) for p, r in zip(predictions, references)) / len(references)


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, its default 13a tokenization)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score), in percent."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer())
    return 100.0 * sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(references)


def rouge_2(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-2 F1 (rouge-score, its default tokenizer and stemming), in percent: the paper's XSum metric."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
    return 100.0 * sum(scorer.score(r, p)["rouge2"].fmeasure for p, r in zip(predictions, references)) / len(references)


def gsm8k_accuracy(predictions: list[str], references: list[str]) -> float:
    """GSM8K exact match in percent: the number after the reference's '####' against the prediction's last number."""
    import re

    def last_number(text: str) -> str:
        found = re.findall(r"-?\d[\d,]*\.?\d*", text.split("####")[-1])
        return found[-1].replace(",", "").rstrip(".") if found else ""

    return 100.0 * sum(last_number(p) == last_number(r) for p, r in zip(predictions, references)) / len(references)


class _WhitespaceTokenizer:
    """rouge-score's default tokenizer drops non-alphanumerics and lowercases; the made-up words need neither."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


@dataclass(frozen=True)
class Task:
    """A generated task: its row maker, metric (higher is better) and the metric's name."""

    name: str
    make: Callable[[random.Random], Row]
    metric: Callable[[list[str], list[str]], float]
    metric_name: str

    def splits(self, train: int, evaluation: int, *, seed: int) -> tuple[list[Row], list[Row]]:
        """(train rows, eval rows with distinct prompts never seen in training), deterministic in `seed`."""
        rng = random.Random(f"{self.name}:{seed}")
        held: dict[str, Row] = {}
        while len(held) < evaluation:
            row = self.make(rng)
            held.setdefault(row["prompt"], row)
        rows = []
        while len(rows) < train:
            row = self.make(rng)
            if row["prompt"] not in held:
                rows.append(row)
        return rows, list(held.values())


TASKS = {
    "arithmetic": Task("arithmetic", arithmetic, exact_match, "accuracy"),
    "translation": Task("translation", translation, bleu, "BLEU"),
    "summary": Task("summary", summary, rouge_l, "ROUGE-L"),
    "arithmetic_v2": Task("arithmetic_v2", arithmetic_v2, exact_match, "accuracy"),
    "arithmetic_split": Task("arithmetic_split", arithmetic_split, exact_match, "accuracy"),
}
STUDY_TASKS = ["arithmetic", "translation", "summary"]  # the published study (scripts/quality.sh)

# Metrics of the paper-scale recipe (benchmarks/quality/evaluation.py --metric ...).
METRICS = {"rouge2": rouge_2, "bleu": bleu, "gsm8k": gsm8k_accuracy, "exact_match": exact_match, "rougeL": rouge_l}
