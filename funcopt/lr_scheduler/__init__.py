"""Learning-rate schedulers, mirroring `torch.optim.lr_scheduler`.

Every `torch.optim.lr_scheduler.Y` is `funcopt.lr_scheduler.y` (snake
case), with torch's arguments minus `optimizer`:

```python
sched = fo.lr_scheduler.step_lr(step_size=30, gamma=0.1)
state, sched_state = sched.init(state)   # torch's constructor: epoch-0 lr
state, sched_state = sched.step(state, sched_state)   # scheduler.step()
fo.get_lr(state)                         # scheduler.get_last_lr()
```

`state` is any pytree holding one funcopt optimizer state; `sched_state`
is a `NamedTuple` of arrays, so `jax.jit(sched.step)` works. The lrs are
torch's (recursive/chainable) sequence; see `funcopt.lr_scheduler._base`
for the protocol and [`as_optax_schedule`][funcopt.lr_scheduler.as_optax_schedule] for
the optax adapter.

Deviations from torch, all documented on the factories: torch's deprecation
and order warnings are not emitted; per-group list arguments are checked at
`init` (where the groups are known); errors raised by torch inside
`step` (OneCycleLR past `total_steps`) raise eagerly but become NaN
lrs under `jit`; two schedulers share `initial_lr` only through
[`chained_scheduler`][funcopt.lr_scheduler.chained_scheduler] /
[`sequential_lr`][funcopt.lr_scheduler.sequential_lr] or `init(initial_lr=...)`;
`cycle_momentum` on an SGD group built with `momentum=0` raises at
`init`.
"""

from ._base import Scheduler as Scheduler
from ._base import SchedulerState as SchedulerState
from ._base import as_optax_schedule as as_optax_schedule
from ._composite import ChainedState as ChainedState
from ._composite import SequentialState as SequentialState
from ._composite import chained_scheduler as chained_scheduler
from ._composite import sequential_lr as sequential_lr
from ._cyclic import CyclicState as CyclicState
from ._cyclic import OneCycleState as OneCycleState
from ._cyclic import SWALRState as SWALRState
from ._cyclic import cyclic_lr as cyclic_lr
from ._cyclic import one_cycle_lr as one_cycle_lr
from ._cyclic import swalr as swalr
from ._plateau import PlateauState as PlateauState
from ._plateau import reduce_lr_on_plateau as reduce_lr_on_plateau
from ._simple import WarmRestartsState as WarmRestartsState
from ._simple import constant_lr as constant_lr
from ._simple import cosine_annealing_lr as cosine_annealing_lr
from ._simple import cosine_annealing_warm_restarts as cosine_annealing_warm_restarts
from ._simple import exponential_lr as exponential_lr
from ._simple import lambda_lr as lambda_lr
from ._simple import linear_lr as linear_lr
from ._simple import multi_step_lr as multi_step_lr
from ._simple import multiplicative_lr as multiplicative_lr
from ._simple import polynomial_lr as polynomial_lr
from ._simple import step_lr as step_lr

__all__ = [
    "ChainedState",
    "CyclicState",
    "OneCycleState",
    "PlateauState",
    "SWALRState",
    "Scheduler",
    "SchedulerState",
    "SequentialState",
    "WarmRestartsState",
    "as_optax_schedule",
    "chained_scheduler",
    "constant_lr",
    "cosine_annealing_lr",
    "cosine_annealing_warm_restarts",
    "cyclic_lr",
    "exponential_lr",
    "lambda_lr",
    "linear_lr",
    "multi_step_lr",
    "multiplicative_lr",
    "one_cycle_lr",
    "polynomial_lr",
    "reduce_lr_on_plateau",
    "sequential_lr",
    "step_lr",
    "swalr",
]
