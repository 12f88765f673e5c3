"""funcopt: torch.optim, bit-faithful, as pure jit-able optax transforms.

Every `torch.optim.X` is `funcopt.x` (snake_case), with torch's arguments
and defaults. An optimizer is an `optax.GradientTransformationExtraArgs`
with one more method, `step(params, grads, state) -> (params, state)`,
torch's `optimizer.step()` as a pure function.
"""

from . import amp as amp
from . import contrib as contrib
from . import flat as flat
from . import lr_scheduler as lr_scheduler
from . import sharding as sharding
from . import swa_utils as swa_utils
from ._add_group import add_param_group as add_param_group
from ._core import Optimizer as Optimizer
from ._core import OptState as OptState
from ._core import make_optimizer as make_optimizer
from ._groups import ParamGroups as ParamGroups
from ._groups import param_groups as param_groups
from ._hparams import get_hparam as get_hparam
from ._hparams import get_lr as get_lr
from ._hparams import set_hparam as set_hparam
from ._hparams import set_lr as set_lr
from .clip import clip_grad_norm as clip_grad_norm
from .clip import clip_grad_norm_transform as clip_grad_norm_transform
from .clip import clip_grad_value as clip_grad_value
from .clip import clip_grad_value_transform as clip_grad_value_transform
from .clip import clip_grads_with_norm as clip_grads_with_norm
from .clip import get_total_norm as get_total_norm
from .optim import adadelta as adadelta
from .optim import adafactor as adafactor
from .optim import adagrad as adagrad
from .optim import adam as adam
from .optim import adamax as adamax
from .optim import adamw as adamw
from .optim import asgd as asgd
from .optim import lbfgs as lbfgs
from .optim import muon as muon
from .optim import nadam as nadam
from .optim import radam as radam
from .optim import rmsprop as rmsprop
from .optim import rprop as rprop
from .optim import sgd as sgd
from .optim import sparse_adam as sparse_adam
from .precision import MasterWeightsState as MasterWeightsState
from .precision import master_weights as master_weights
from .precision import precision_policy as precision_policy
from .reliability import NonFiniteWarning as NonFiniteWarning
from .reliability import SkipNonfiniteState as SkipNonfiniteState
from .reliability import debug_nonfinite as debug_nonfinite
from .reliability import skip_nonfinite as skip_nonfinite
from .train_state import TrainState as TrainState

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("checkpoint", "compare", "torch_interop")


def __getattr__(name: str):
    """`fo.torch_interop`, `fo.checkpoint`, `fo.compare`: imported on first
    use, so `import funcopt` imports neither torch nor orbax.
    """
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'funcopt' has no attribute {name!r}")


__all__ = [
    "OptState",
    "Optimizer",
    "ParamGroups",
    "TrainState",
    "add_param_group",
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "amp",
    "asgd",
    "clip_grad_norm",
    "clip_grad_norm_transform",
    "clip_grad_value",
    "clip_grad_value_transform",
    "clip_grads_with_norm",
    "get_hparam",
    "get_lr",
    "get_total_norm",
    "lbfgs",
    "master_weights",
    "MasterWeightsState",
    "NonFiniteWarning",
    "precision_policy",
    "skip_nonfinite",
    "SkipNonfiniteState",
    "debug_nonfinite",
    "lr_scheduler",
    "make_optimizer",
    "muon",
    "nadam",
    "param_groups",
    "radam",
    "rmsprop",
    "rprop",
    "set_hparam",
    "set_lr",
    "sgd",
    "sparse_adam",
    "swa_utils",
]
