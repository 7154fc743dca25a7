"""wiring.check_teacher_tokenizer: which teacher blocks have a tokenizer checked before any work, and that the
student's tokenizer is loaded only when there is one."""

import pytest

from axolotl_xkd.args import ModelTeacher, PrecomputedTeacher, ServerTeacher
from axolotl_xkd.tiny import build_tokenizer
from axolotl_xkd.wiring import check_teacher_tokenizer, teacher_tokenizer_key


class Loads:
    """A student-tokenizer loader that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return build_tokenizer()


@pytest.mark.parametrize("teacher", [
    None,  # `teacher: null` (CE only): the plugin's first hook once stopped every such run with AttributeError
    PrecomputedTeacher(path="store", model_path="teacher"),
    ServerTeacher(base_url="http://127.0.0.1:8000"),
], ids=["no_teacher", "same_tokenizer_store", "same_tokenizer_server"])
def test_nothing_to_check_loads_no_student_tokenizer(teacher):
    loads = Loads()
    check_teacher_tokenizer(teacher, loads)
    assert teacher_tokenizer_key(teacher) is None and loads.calls == 0


def test_keys_named_by_source():
    assert teacher_tokenizer_key(ModelTeacher(path="t")) == "path"
    assert teacher_tokenizer_key(ModelTeacher(path="t", tokenizer_path="tok")) == "tokenizer_path"
    assert teacher_tokenizer_key(PrecomputedTeacher(path="s", model_path="t", cross_tokenizer=True)) == "model_path"
    assert teacher_tokenizer_key(ServerTeacher(base_url="http://127.0.0.1:8000", tokenizer_path="tok",
                                               cross_tokenizer=True)) == "tokenizer_path"


def test_another_tokenizer_without_the_key_is_refused_naming_it(tmp_path):
    other = build_tokenizer()
    other.add_tokens(["<extra>"])
    other.save_pretrained(tmp_path / "teacher")
    build_tokenizer().save_pretrained(tmp_path / "same")
    loads = Loads()
    check_teacher_tokenizer(ModelTeacher(path=str(tmp_path / "same")), loads)
    assert loads.calls == 1
    with pytest.raises(ValueError, match=rf"xkd.teacher.path='{tmp_path / 'teacher'}'.*differs from the student's"):
        check_teacher_tokenizer(ModelTeacher(path=str(tmp_path / "teacher")), loads)
    check_teacher_tokenizer(ModelTeacher(path=str(tmp_path / "teacher"), cross_tokenizer=True), loads)
    assert loads.calls == 3
