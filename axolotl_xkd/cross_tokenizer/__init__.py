"""Distillation across tokenizers: a teacher's next-token distributions over its own tokens turned into a top-k
signal at the student's positions, in three steps, one module each: `token_bytes` (what each token adds to the text,
and the vocabulary map), `alignment` (each student position's teacher position, by byte spans) and `projection`
(each teacher token's mass given to the student token its bytes start with, the observed path's to the student's
own token).

The student's text of a sequence is the concatenation of its tokens' bytes; the teacher re-tokenizes that text.
Student position i, whose prefix u_<=i ends at byte b, reads the teacher's distribution at the last teacher position
j whose prefix ends at or before b. The teacher's next token t_{j+1} then starts with the bytes r between the two
ends (empty where both prefixes end at b). Every teacher token t that starts with r gives its probability to the
student token that the rest of its bytes start with (the longest such student token, or its exact twin where r is
empty), normalised over the tokens that start with r; the teacher's own next token gives the student's own next
token its share along the observed path. docs/cross_tokenizer.md has the math and the rules for special tokens,
BOS, leading spaces and text the teacher spells otherwise.

Imports torch and the loss's signal helpers; reads tokenizers through their own (fast) backend. Knows nothing of the
trainer, Axolotl or the config schema.
"""

from axolotl_xkd.cross_tokenizer.alignment import AlignedSegment, Aligner, matching_blocks
from axolotl_xkd.cross_tokenizer.projection import Projection, path_rows, project
from axolotl_xkd.cross_tokenizer.token_bytes import KEY, RULE, VocabMap, check_readable, token_pieces

__all__ = ["KEY", "RULE", "AlignedSegment", "Aligner", "Projection", "VocabMap", "check_readable",
           "matching_blocks", "path_rows", "project", "token_pieces"]
