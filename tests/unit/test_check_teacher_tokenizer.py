"""wiring.check_teacher_tokenizer with `teacher: null`."""

from axolotl_xkd.tiny import build_tokenizer
from axolotl_xkd.wiring import check_teacher_tokenizer


def test_no_teacher_is_not_checked():
    """Regression: with `teacher: null` (CE only, the quality study's sft arm) the plugin's first training hook
    stopped every run with AttributeError: 'NoneType' object has no attribute 'source'."""
    check_teacher_tokenizer(None, build_tokenizer())
