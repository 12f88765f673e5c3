"""funcopt: torch.optim, bit-faithful, as pure jit-able optax transforms.

Every ``torch.optim.X`` is ``funcopt.x`` (snake_case), with torch's arguments
and defaults. An optimizer is an ``optax.GradientTransformationExtraArgs``
with one more method, ``step(params, grads, state) -> (params, state)``,
torch's ``optimizer.step()`` as a pure function.
"""

from ._core import Optimizer as Optimizer
from ._core import OptState as OptState
from ._core import make_optimizer as make_optimizer
from ._groups import ParamGroups as ParamGroups
from ._groups import param_groups as param_groups
from ._hparams import get_hparam as get_hparam
from ._hparams import get_lr as get_lr
from ._hparams import set_hparam as set_hparam
from ._hparams import set_lr as set_lr
from .optim import adam as adam
from .optim import adamw as adamw
from .optim import sgd as sgd
from .train_state import TrainState as TrainState

__version__ = "0.1.0"

__all__ = [
    "OptState",
    "Optimizer",
    "ParamGroups",
    "TrainState",
    "adam",
    "adamw",
    "get_hparam",
    "get_lr",
    "make_optimizer",
    "param_groups",
    "set_hparam",
    "set_lr",
    "sgd",
]
