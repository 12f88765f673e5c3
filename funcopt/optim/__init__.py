"""One module per torch.optim optimizer."""

from .adam import adam as adam
from .adam import adamw as adamw
from .sgd import sgd as sgd

__all__ = ["adam", "adamw", "sgd"]
