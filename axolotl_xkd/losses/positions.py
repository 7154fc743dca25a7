"""Where the MDP of XKD_METHOD.md section 2 sits in a (B, T) batch: actions, terminal states and the reward's
position. The response-position rule lives here and only here: position i is a response position when its
action a_i = u_{i+1} is a label, i.e. labels[i+1] != IGNORE_INDEX (and i+1 is in the same packed segment).
Imports torch only.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""Label of a position the loss does not count (prompt, padding), as in transformers and Axolotl."""


def shift_targets(labels: Tensor, position_ids: Tensor | None, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Action a_i = u_{i+1} at position i, (B, T); ignore_index where there is no action.

    The last position has none, and in packed rows neither has the last token of a segment:
    its next token starts another sequence (position_ids resets to 0 there).
    """
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        crosses = torch.zeros_like(labels, dtype=torch.bool)
        crosses[:, :-1] = position_ids[:, 1:] == 0
        targets = targets.masked_fill(crosses, ignore_index)
    return targets


def response_mask(labels: Tensor, position_ids: Tensor | None) -> Tensor:
    """(B, T) bool: True at the response positions, the ones the loss counts (their action is a label)."""
    return shift_targets(labels, position_ids) != IGNORE_INDEX


def nonterminal_next(targets: Tensor, *, ignore_index: int = IGNORE_INDEX, eos_token_id: int | None = None) -> Tensor:
    """(B, T) bool: True where s'_i is not terminal, so TD_i includes gamma * Q(s'_i, a'_i).

    s'_i is terminal when a_i is EOS, or when position i+1 has no unmasked action (a masked label,
    the end of the row, or the end of a packed segment, all already ignore_index in `targets`).
    """
    has_next = torch.zeros_like(targets, dtype=torch.bool)
    has_next[:, :-1] = targets[:, 1:] != ignore_index
    if eos_token_id is not None:
        has_next &= targets != eos_token_id
    return has_next


def align_reward(reward: Tensor, reward_input: str) -> Tensor:
    """Per-position reward-head output (B, T) -> the value used for action a_i at position i.

    next_state reads R_i from h_{i+1} (the state a_i leads to); state reads it from h_i.
    """
    if reward_input == "state":
        return reward
    aligned = torch.zeros_like(reward)
    aligned[:, :-1] = reward[:, 1:]
    return aligned
