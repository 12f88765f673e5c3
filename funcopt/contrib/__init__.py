"""Optimizers from the torch ecosystem, exact against their reference packages.

Each is written with :func:`funcopt.make_optimizer` and mirrors one class of a
PyPI package (pinned in ``constraints.txt``, tested by the parity table):

* :func:`adamw_schedule_free`, :func:`sgd_schedule_free`:
  ``schedulefree.AdamWScheduleFree`` / ``SGDScheduleFree``, with
  :func:`schedulefree_eval_params` / :func:`schedulefree_train_params` for
  torch's ``optimizer.eval()`` / ``train()``;
* :func:`lion`: ``lion_pytorch.Lion``;
* :func:`prodigy`: ``prodigyopt.Prodigy``;
* :func:`lamb`, :func:`adan`: ``pytorch_optimizer.Lamb`` / ``Adan``.

Group-level scalars and cross-parameter reductions (schedule-free's weight
sums, Prodigy's ``d``, global gradient norms) use
:func:`funcopt.contrib._grouped.with_group_state`.
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
