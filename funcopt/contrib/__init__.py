"""Optimizers from the torch ecosystem, exact against their reference packages.

Each is written with [`funcopt.make_optimizer`][funcopt.make_optimizer] and mirrors one
class of a PyPI package (pinned in `constraints.txt`, tested by the parity table):

* [`adamw_schedule_free`][funcopt.contrib.adamw_schedule_free],
  [`sgd_schedule_free`][funcopt.contrib.sgd_schedule_free]:
  `schedulefree.AdamWScheduleFree` / `SGDScheduleFree`, with
  [`schedulefree_eval_params`][funcopt.contrib.schedulefree_eval_params] /
  [`schedulefree_train_params`][funcopt.contrib.schedulefree_train_params] for torch's
  `optimizer.eval()` / `train()`;
* [`lion`][funcopt.contrib.lion.lion]: `lion_pytorch.Lion`;
* [`prodigy`][funcopt.contrib.prodigy.prodigy]: `prodigyopt.Prodigy`;
* [`lamb`][funcopt.contrib.lamb.lamb], [`adan`][funcopt.contrib.adan.adan]:
  `pytorch_optimizer.Lamb` / `Adan`.

Group-level scalars and cross-parameter reductions (schedule-free's weight
sums, Prodigy's `d`, global gradient norms) use
`funcopt.contrib._grouped.with_group_state`.
"""

from .adan import adan as adan
from .lamb import lamb as lamb
from .lion import lion as lion
from .prodigy import prodigy as prodigy
from .schedulefree import adamw_schedule_free as adamw_schedule_free
from .schedulefree import schedulefree_eval_params as schedulefree_eval_params
from .schedulefree import schedulefree_train_params as schedulefree_train_params
from .schedulefree import sgd_schedule_free as sgd_schedule_free

__all__ = [
    "adamw_schedule_free",
    "adan",
    "lamb",
    "lion",
    "prodigy",
    "schedulefree_eval_params",
    "schedulefree_train_params",
    "sgd_schedule_free",
]
