"""The learned reward as a product: `scorer` scores pairs and reranks samples, `training_format` renders prompts as
training did, `loading` loads a student with its reward head and checks they belong together."""

from axolotl_xkd.scoring.loading import check_head_matches, load_scorer
from axolotl_xkd.scoring.scorer import RankBy, RewardScorer, ScoredResponse
from axolotl_xkd.scoring.training_format import TrainingFormat, saved_training_config

__all__ = [
    "RankBy",
    "RewardScorer",
    "ScoredResponse",
    "TrainingFormat",
    "check_head_matches",
    "load_scorer",
    "saved_training_config",
]
