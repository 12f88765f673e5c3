"""One module per torch.optim optimizer."""

from .adadelta import adadelta as adadelta
from .adafactor import adafactor as adafactor
from .adagrad import adagrad as adagrad
from .adam import adam as adam
from .adam import adamw as adamw
from .adamax import adamax as adamax
from .asgd import asgd as asgd
from .lbfgs import lbfgs as lbfgs
from .muon import muon as muon
from .nadam import nadam as nadam
from .radam import radam as radam
from .rmsprop import rmsprop as rmsprop
from .rprop import rprop as rprop
from .sgd import sgd as sgd
from .sparse_adam import sparse_adam as sparse_adam

__all__ = [
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "asgd",
    "lbfgs",
    "muon",
    "nadam",
    "radam",
    "rmsprop",
    "rprop",
    "sgd",
    "sparse_adam",
]
