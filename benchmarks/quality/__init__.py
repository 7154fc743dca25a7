"""The quality study: generated tasks, scoring, the study, the X-KD sweep and the TRL baselines."""
