"""The one time limit a test may put on a child process: a hang guard.

Tests that run a script in a fresh Python process (the 8-device sharding
checks, the two-process ``jax.distributed`` example, the benchmark command,
a checkpoint writer killed mid-save) pass ``timeout=HANG_GUARD_S``. It is not
a speed check: it only turns a hung child into a failure instead of a CI run
that never ends. The slowest child, ``tests/_sharded_checks.py``, takes about
100 s on a quiet 2-core machine and over 300 s with the other core busy;
1,500 s is far above any busy-machine run and still well inside CI's limit.
"""

HANG_GUARD_S = 1500
