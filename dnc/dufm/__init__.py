"""The deep unconstrained features model: model and objective (model.py), training of one run or of a
batch of runs (train.py), comparison of a trained solution with the closed forms (compare.py). See
docs/theory.md."""

from dnc.dufm.model import DUFMState, Objective, forward, gradients, objective, targets
from dnc.dufm.train import TrainResult, init_dufm, train_dufm, train_dufm_batch
from dnc.settings import DUFMConfig

__all__ = ["DUFMConfig", "DUFMState", "Objective", "TrainResult", "forward", "gradients", "init_dufm",
           "objective", "targets", "train_dufm", "train_dufm_batch"]
