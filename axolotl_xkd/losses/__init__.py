"""Pure X-KD loss math: torch only, no Axolotl, transformers or DeepSpeed import."""

from axolotl_xkd.losses.divergence import divergence
from axolotl_xkd.losses.positions import IGNORE_INDEX
from axolotl_xkd.losses.reward_head import VariationalRewardHead
from axolotl_xkd.losses.signal import DenseSignal, TeacherSignal, TopKSignal
from axolotl_xkd.losses.td import Q_FORMS
from axolotl_xkd.losses.xkd import XKDHyperparams, XKDLossOutput, xkd_loss
from axolotl_xkd.options import DIVERGENCES, TOKEN_DIVERGENCES

__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "Q_FORMS",
    "TOKEN_DIVERGENCES",
    "DenseSignal",
    "TeacherSignal",
    "TopKSignal",
    "VariationalRewardHead",
    "XKDHyperparams",
    "XKDLossOutput",
    "divergence",
    "xkd_loss",
]
