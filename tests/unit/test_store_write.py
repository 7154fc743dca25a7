"""store/write.py's records: any teacher source's signal at the response positions, as top-k records, against the
float64 log-softmax of the teacher's own logits."""

from __future__ import annotations

import pytest
import torch

from axolotl_xkd.cross_tokenizer import Aligner
from axolotl_xkd.store.write import pad_batch, records
from axolotl_xkd.teachers.aligned import AlignedTeacherSource
from axolotl_xkd.teachers.model import ModelTeacherSource
from axolotl_xkd.tiny import build_model, build_tokenizer, encode_rows
from tests.unit.test_cross_tokenizer import sentencepiece

ROWS = [{"prompt": "what is 3+4=", "response": "7"}, {"prompt": "5-2=", "response": "3 and 9"}]


class LogitsOnly(ModelTeacherSource):
    """The same teacher read through its own logits (a head that is not a plain Linear takes this path)."""

    @property
    def fusable(self) -> bool:
        return False


def student_rows(tokenizer) -> list[dict]:
    ids, labels = encode_rows(tokenizer, ROWS)
    lengths = (ids != tokenizer.pad_token_id).sum(-1).tolist()
    return [{"input_ids": ids[b, :n].tolist(), "labels": labels[b, :n].tolist()} for b, n in enumerate(lengths)]


@pytest.mark.parametrize("kind", [ModelTeacherSource, LogitsOnly])
def test_records_are_the_top_k_log_probs_at_the_response_positions(kind):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden=32, layers=2, seed=0).double().eval()
    rows = student_rows(tokenizer)
    source = kind(model, len(tokenizer))
    assert source.record_width(5) == 5
    batch, response = pad_batch(rows, tokenizer.pad_token_id, torch.device("cpu"))
    got = records(source, batch, response, width=5, vocab_size=len(tokenizer))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for b, (ids, logprobs) in enumerate(got):
        want = torch.log_softmax(logits[b][response[b]][:, : len(tokenizer)], dim=-1).topk(5, dim=-1)
        assert ids.shape == (int(response[b].sum()), 5) and ids.dtype.name == "int64"
        assert (ids == want.indices.numpy()).all()
        torch.testing.assert_close(torch.from_numpy(logprobs), want.values.float(), atol=1e-6, rtol=0)


def test_records_of_a_teacher_of_another_tokenizer_are_its_signal():
    """A source of records keeps its own width (`record_width`) and its signal's entries, at the response positions."""
    student, teacher = build_tokenizer(), sentencepiece()
    model = build_model(teacher, hidden=32, layers=2, seed=0).double().eval()
    source = AlignedTeacherSource(model, Aligner(student, teacher, "test"), top_k=6)
    assert source.record_width(64) == source.width == 7
    batch, response = pad_batch(student_rows(student), student.pad_token_id, torch.device("cpu"))
    got = records(source, batch, response, width=source.width, vocab_size=len(student))
    signal = source.get_signal(batch)
    for b, (ids, logprobs) in enumerate(got):
        assert (ids == signal.token_ids[b][response[b]].numpy()).all()
        assert (logprobs == signal.logprobs[b][response[b]].float().numpy()).all()
