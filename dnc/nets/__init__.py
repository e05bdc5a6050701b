"""Networks with a DUFM head: models (models.py), training with checkpoints and resume (train.py),
feature extraction and the head's DUFM objective (extract.py), comparison with theory (compare.py)."""
