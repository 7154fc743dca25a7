"""The precomputed top-k store: its on-disk format (format.py), writing it (write.py, `axolotl xkd precompute`),
reading it as training data (read.py) and collating its rows into batches (collate.py)."""
