"""benchmarks/quality/cross_tokenizer.py and gold.py: the GOLD rows are what GOLD's own preparation would write for
the character student, the coverage count, the arms, and the dev choice and target verdicts of the report; for the
BPE students, the vocabulary sizes, arms, per-direction verdicts, report and target agreement (no training here)."""

from __future__ import annotations

from pathlib import Path

from axolotl_xkd.tiny import build_bpe_tokenizer, build_tokenizer
from benchmarks.quality import cross_tokenizer as ct
from benchmarks.quality.gold import gold_rows

ROWS = [{"prompt": "ba ke:", "response": "lum dok"}, {"prompt": "mi tu so:", "response": "gen pif zar"}]


def test_gold_rows_for_the_character_student():
    """Completion-relative byte spans of every completion token, the EOS spanning the EOS string GOLD appends to the
    completion text; (0, 0) on the prompt, which starts with the BOS. (The same ids and offsets as TRL's own
    encode_with_byte_offsets gives with its ByteLevel check lifted; importing TRL here would cost CI ~15 s.)"""
    student = build_tokenizer()
    first, second = gold_rows(student, ROWS, max_length=48)
    prompt = student("ba ke:")["input_ids"]
    assert prompt[0] == student.bos_token_id and len(prompt) == 7
    assert first["input_ids"] == prompt + student("lum dok", add_special_tokens=False)["input_ids"] + [
        student.eos_token_id]
    assert first["byte_offsets"] == [(0, 0)] * 7 + [(k, k + 1) for k in range(7)] + [(7, 11)]
    assert first["completion_mask"] == [0] * 7 + [1] * 8 and first["attention_mask"] == [1] * 15
    assert (first["original_prompt_text"], first["original_completion_text"]) == ("ba ke:", "lum dok</s>")
    assert second["byte_offsets"][-1] == (11, 15)
    assert gold_rows(student, ROWS, max_length=16) == [first]  # 15 tokens kept, 22 dropped


def test_response_coverage():
    from axolotl_xkd.cross_tokenizer import Aligner

    student = build_tokenizer()
    assert ct.response_coverage(Aligner(student, build_tokenizer(), "same"), student, ROWS) == 1.0
    texts = [r["prompt"] + r["response"] for r in ROWS] * 20
    words = build_bpe_tokenizer(texts, style="byte_level", vocab_size=ct.BPE_VOCAB)
    # Whole words on the teacher's side: only the positions at word ends (and the EOS) are aligned.
    coverage = ct.response_coverage(Aligner(student, words, "bpe"), student, ROWS)
    assert 0.2 < coverage < 0.6


def test_arms():
    table = ct.arms(Path("/t"), ["fkl", "jsd"])
    assert list(table) == ["sft", "gkd_same_fkl", "cross_fkl", "cross_jsd", "cross_default"]
    cross = {"source": "model", "path": "/t", "cross_tokenizer": True}
    assert table["cross_jsd"] == {"divergence": "jsd", "reward_kl_weight": 0.0, "td_weight": 0.0, "teacher": cross}
    assert table["cross_default"] == {"teacher": cross}  # every other key at the plugin's defaults
    assert "teacher" not in table["gkd_same_fkl"]  # study.train_one gives it the study's teacher


def run(task: str, arm: str, seed: int, test: float, dev: float) -> dict:
    return {"task": task, "method": arm, "seed": str(seed), "metric": str(test), "dev_metric": str(dev),
            "train_seconds": "1", "distill": "0.1"}


def test_choice_by_dev_mean_and_verdicts():
    runs = [run(t, arm, s, test, dev) for t in ("a", "b") for s in (0, 1) for arm, test, dev in (
        ("sft", 50, 50), ("gkd_same_fkl", 80, 80), ("cross_fkl", 70, 78), ("cross_rkl", 90, 60),
        ("trl_gold_off", 72 + s, 70))]
    chosen, means = ct.choose(runs, ["a", "b"], ["cross_fkl", "cross_rkl", "cross_jsd"])
    assert chosen == "cross_fkl" and means == {"cross_fkl": 78.0, "cross_rkl": 60.0}  # on dev, not test
    lines = ct.verdicts(runs, ["a", "b"], chosen)
    assert lines[0].startswith("- dev mean >= 0.95x") and "**met**" in lines[0] and "78.0 / 80.0 = 0.97" in lines[0]
    assert "**met**" in lines[1]  # 70 >= 50
    assert "**missed on a, b**" in lines[2] and "(behind)" in lines[2]  # 70 ± 0 below 72.5 - 0.7


def test_bpe_vocab_size_gives_both_conventions_the_same_merges():
    texts = ["6+0+5=6+0=06,06+5=11", "ba ke:lum dok"]
    assert ct.bpe_vocab_size(texts, "byte_level") == ct.BPE_VOCAB == 256 + 4 + ct.BPE_MERGES
    characters = set("6+0=5,1bakeludom:") | {"\u2581"}  # the space is written `▁`
    assert ct.bpe_vocab_size(texts, "sentencepiece") == 4 + len(characters) + ct.BPE_MERGES
    assert [ct.other_style(s) for s in ct.BPE_STYLES] == ["sentencepiece", "byte_level"]


def test_bpe_arms():
    table = ct.bpe_arms(Path("/same"), Path("/other"))
    assert list(table) == ct.BPE_ARMS == ["sft", "gkd_same_fkl", "cross_fkl"]
    assert table["sft"]["teacher"] is None and table["sft"]["alpha_kd"] == 0.0
    off = {"divergence": "forward_kl", "reward_kl_weight": 0.0, "td_weight": 0.0}
    assert table["gkd_same_fkl"] == {**off, "teacher": {"source": "model", "path": "/same"}}
    assert table["cross_fkl"] == {**off, "teacher": {"source": "model", "path": "/other", "cross_tokenizer": True}}


def test_bpe_verdicts_per_direction():
    """Each student style's runs are compared within that style only; a missed target says by how much."""
    table = {"byte_level": (("sft", 50, 50), ("gkd_same_fkl", 80, 80), ("cross_fkl", 70, 78)),
             "sentencepiece": (("sft", 60, 60), ("gkd_same_fkl", 90, 90), ("cross_fkl", 55, 81))}
    runs = [{**run("t", arm, s, test, dev), "student": student} for s in (0, 1) for student, arms in table.items()
            for arm, test, dev in arms]
    byte_level, sentencepiece = ct.bpe_verdicts(runs, "t", "byte_level"), ct.bpe_verdicts(runs, "t", "sentencepiece")
    assert "**met**: 78.0 / 80.0 = 0.97." in byte_level[0] and "**met**: 70.0 vs 50.0." in byte_level[1]
    assert "**missed**: 81.0 / 90.0 = 0.90, 4.5 points below the mark." in sentencepiece[0]  # 0.95 * 90 = 85.5
    assert "**missed**: 55.0 vs 60.0, 5.0 points below." in sentencepiece[1]
    assert "no runs of both yet" in ct.bpe_verdicts(runs, "t", "other")[0]


def test_bpe_report():
    runs = [{**run("t", arm, s, 60 + s, 70), "student": student} for s in (0, 1) for student in ct.BPE_STYLES
            for arm in ct.BPE_ARMS]
    models = {("t", s): {"vocab": 300, "teacher_eval": 98.0, "teacher_dev": 97.0, "teacher_seconds": 100.0}
              for s in ct.BPE_STYLES}
    alignment = {("t", s): {"exact": 20, "student_tokens": 11.0, "teacher_tokens": 5.0, "coverage": 0.5,
                            "unmapped_mass": 0.25, "same_first": 0.9, "same_rest": 1.0, "cross_first": 0.5,
                            "cross_rest": 0.95} for s in ct.BPE_STYLES}
    earlier = [{**run("t", "cross_fkl", s, 2 + s, 4), "student": "byte_level"} for s in (0, 1)]
    text = ct.bpe_report(runs, ["t"], models, alignment, "python -m benchmarks.quality.cross_tokenizer --bpe-students",
                         earlier)
    assert "| t: sentencepiece-style teacher -> byte-level student | 20 | 11.0 / 5.0 | 50.0% | 25.0% |" in text
    assert "| cross_fkl | 70.0 ± 0.0 (n=2) | 70.0 ± 0.0 (n=2) |" in text  # dev, both directions
    assert "| cross_fkl | 60.5 ± 0.7 (n=2) | 60.5 ± 0.7 (n=2) |" in text  # test
    assert "| t: byte-level teacher -> sentencepiece-style student | 1.00 | 1.00 | 1.00 | 1.00 |" in text
    assert "sft 2, gkd_same_fkl 2, cross_fkl 2" in text
    assert "| t: byte-level teacher -> sentencepiece-style student | 90.0% / 100.0% | 50.0% / 95.0% |" in text
    assert "| cross_fkl | 4.0 ± 0.0 (n=2) | 2.5 ± 0.7 (n=2) |  |  |" in text  # before 12466a1, byte-level only


def test_target_agreement_of_the_same_tokenizer_is_the_teachers_own_argmax(tmp_path):
    """With identical tokenizers the record is the teacher's own distribution: the agreement is the share of
    response positions where the teacher's argmax is the row's next token, split at the first `first` positions."""
    import torch

    from axolotl_xkd.tiny import build_model

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden=16, layers=1, seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    hits = {True: [], False: []}
    for row in ROWS:
        prompt = tokenizer(row["prompt"])["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
        for n, token in enumerate(response):
            hits[n < 2].append(int(logits[len(prompt) - 1 + n].argmax()) == token)
    expected = (sum(hits[True]) / len(hits[True]), sum(hits[False]) / len(hits[False]))
    assert ct.target_agreement(tokenizer, tmp_path, ROWS, first=2) == expected

