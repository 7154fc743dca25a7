"""The embedded default: a tiny character tokenizer, teacher and student, and an arithmetic task.

Everything is built in code (nothing is downloaded), so the README's main job, the tests and the
benchmarks can run `axolotl train` on the CPU. `python -m axolotl_xkd.tiny --out DIR` writes:
DIR/tokenizer (shared), DIR/teacher (briefly trained to know the task), DIR/student (untrained,
several times smaller) and DIR/data/{train,eval}.jsonl with prompt/response rows (the eval rows are
not in the training file, but the task has only 200 distinct problems, so most of their prompts are).
`--teacher-tokenizer byte_level` (or `sentencepiece`) gives the teacher a BPE tokenizer of its own, trained in code on
the training text (`build_bpe_tokenizer`) and saved in DIR/teacher: a teacher of another tokenizer than the student's,
for `cross_tokenizer: true` (docs/cross_tokenizer.md, "Try it on the CPU").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import string
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARACTERS = string.digits + string.ascii_letters + " +-*=()?.,:;\n"
TEACHER_TOKENIZERS = ("character", "byte_level", "sentencepiece")  # build_all's teacher_tokenizer
# A BPE teacher's vocabulary: byte-level BPE's base is the 256 bytes and the 4 specials; up to 64 merges on top (the
# arithmetic text has fewer pairs to merge, so fewer are made). The cross-tokenizer study's size.
TEACHER_BPE_VOCAB = 256 + 4 + 64


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, BOS prepended; about 80 tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_bpe_tokenizer(texts: list[str], *, style: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained in code on `texts`, another vocabulary and other merges than `build_tokenizer`'s.

    `byte_level` (GPT-2 / Qwen style): a space is part of the next token (`Ġ`), every byte is a token, no BOS.
    `sentencepiece` (Llama-2 style): a space is `▁`, a dummy prefix before the text, BOS prepended, byte fallback
    tokens <0x00>..<0xFF> for characters the merges never saw. Used as teachers of another tokenizer.
    """
    specials = list(SPECIALS)
    if style == "byte_level":
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif style == "sentencepiece":
        core = Tokenizer(models.BPE(byte_fallback=True))
        core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
        core.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                          decoders.Strip(" ", 1, 0)])
        alphabet = sorted(set("".join(texts).replace(" ", "\u2581")) | {"\u2581"})
    else:
        raise ValueError(f"style {style!r}: byte_level or sentencepiece")
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=alphabet, show_progress=False))
    if style == "sentencepiece":
        spec = json.loads(core.to_str())
        vocab = spec["model"]["vocab"]
        for byte in range(256):
            vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
        core = Tokenizer.from_str(json.dumps(spec))
        bos = core.token_to_id("<s>")
        core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                            special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def arithmetic_rows(count: int, *, seed: int, max_operand: int = 9) -> list[dict[str, str]]:
    """Prompt 'a+b=' (or 'a-b=') with the answer as response, operands in [0, max_operand].

    Single digits by default: a task the tiny teacher learns in a few hundred CPU steps.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice("+-")
        rows.append({"prompt": f"{a}{op}{b}=", "response": str(a + b if op == "+" else a - b)})
    return rows


def build_model(tokenizer: PreTrainedTokenizerFast, *, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    """A small Llama over `tokenizer`'s vocabulary."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def encode_rows(tokenizer: PreTrainedTokenizerFast, rows: list[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (prompt masked, EOS appended), as Axolotl tokenizes them."""
    ids, labels = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(prompt + response)
        labels.append([-100] * len(prompt) + response)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return (
        torch.tensor([r + [pad] * (width - len(r)) for r in ids]),
        torch.tensor([r + [-100] * (width - len(r)) for r in labels]),
    )


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block. The tiny models' ops are too small to split: on the 2-core
    machines one thread trained the teacher 4-10x faster per step than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_teacher(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, rows: list[dict[str, str]],
                  *, steps: int, seed: int, batch_size: int = 64, lr: float = 3e-3, log_every: int = 0) -> float:
    """Plain supervised training so the teacher knows the task; returns the final loss. With `log_every`,
    prints the step, loss and elapsed time every `log_every` steps."""
    ids, labels = encode_rows(tokenizer, rows)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    start = time.perf_counter()
    with one_thread():
        for step in range(1, steps + 1):
            pick = torch.randint(0, len(rows), (batch_size,), generator=generator)
            loss = model(input_ids=ids[pick], attention_mask=ids[pick] != tokenizer.pad_token_id,
                         labels=labels[pick]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if log_every and (step % log_every == 0 or step == steps):
                print(f"tiny teacher: step {step}/{steps}, loss {float(loss.detach()):.3f}, "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def greedy_exact_matches(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
                         rows: list[dict[str, str]]) -> list[bool]:
    """Per row: does the model's greedy answer to its prompt reproduce its response exactly?"""
    matches = []
    with one_thread():
        for row in rows:
            ids = tokenizer(row["prompt"], return_tensors="pt").input_ids
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            matches.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == row["response"])
    return matches


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """One JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_all(out: str | Path, *, teacher_steps: int = 800, train_rows: int = 512, seed: int = 0,
              log_every: int = 0, teacher_tokenizer: str = "character",
              teacher_vocab_size: int = TEACHER_BPE_VOCAB) -> dict[str, Path]:
    """Write tokenizer, teacher, student and data under `out`; returns their paths. `log_every`: teacher
    progress lines (0: none). `teacher_tokenizer`: the student's character tokenizer, or a BPE (`byte_level`,
    `sentencepiece`) of `teacher_vocab_size` tokens at most trained on the training text, saved with the teacher."""
    if teacher_tokenizer not in TEACHER_TOKENIZERS:
        raise ValueError(f"teacher_tokenizer {teacher_tokenizer!r}: one of {', '.join(TEACHER_TOKENIZERS)}")
    out = Path(out)
    tokenizer = build_tokenizer()
    paths = {name: out / name for name in ("tokenizer", "teacher", "student", "data")}
    tokenizer.save_pretrained(paths["tokenizer"])
    rows = arithmetic_rows(train_rows + 64, seed=seed)
    train, evaluation = rows[:train_rows], rows[train_rows:]
    write_jsonl(paths["data"] / "train.jsonl", train)
    write_jsonl(paths["data"] / "eval.jsonl", evaluation)
    words = tokenizer
    if teacher_tokenizer != "character":
        words = build_bpe_tokenizer([r["prompt"] + r["response"] for r in train], style=teacher_tokenizer,
                                    vocab_size=teacher_vocab_size)
    teacher = build_model(words, hidden=128, layers=2, seed=seed)
    start = time.perf_counter()
    teacher_loss = train_teacher(teacher, words, train, steps=teacher_steps, seed=seed, log_every=log_every)
    seconds = time.perf_counter() - start
    correct = sum(greedy_exact_matches(teacher, words, evaluation))
    teacher.save_pretrained(paths["teacher"])
    words.save_pretrained(paths["teacher"])
    student = build_model(tokenizer, hidden=32, layers=2, seed=seed + 1)
    student.save_pretrained(paths["student"])
    tokenizer.save_pretrained(paths["student"])
    kind = "" if teacher_tokenizer == "character" else f", {teacher_tokenizer} tokenizer of {len(words)} tokens"
    print(f"tiny teacher: {teacher_steps} steps in {seconds:.0f} s, training loss {teacher_loss:.3f}, greedy exact "
          f"match on the {len(evaluation)} eval rows {correct}/{len(evaluation)}, saved to {paths['teacher']}{kind}",
          flush=True)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/tiny", help="output folder (default: runs/tiny)")
    parser.add_argument("--teacher-steps", type=int, default=800, help="teacher training steps (default: 800)")
    parser.add_argument("--log-every", type=int, default=100, help="teacher progress every N steps (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-tokenizer", choices=TEACHER_TOKENIZERS, default="character",
                        help="the teacher's tokenizer: the student's (character, default) or a BPE trained on the "
                        "training text, for cross_tokenizer: true (docs/cross_tokenizer.md)")
    parser.add_argument("--teacher-vocab-size", type=int, default=TEACHER_BPE_VOCAB,
                        help=f"a BPE teacher tokenizer's vocabulary size at most (default: {TEACHER_BPE_VOCAB})")
    args = parser.parse_args()
    build_all(args.out, teacher_steps=args.teacher_steps, seed=args.seed, log_every=args.log_every,
              teacher_tokenizer=args.teacher_tokenizer, teacher_vocab_size=args.teacher_vocab_size)


if __name__ == "__main__":
    main()
