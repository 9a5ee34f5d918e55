"""Interpreter settings for a process that serves: the engine's, and the HTTP server's.

- The switch interval: the engine thread and the other threads of the process (the event loop,
  the pipe's reader) share one interpreter lock; at Python's default of 5 ms a thread that
  wants it back waits up to a whole decode step. It is handed over every 0.5 ms instead
  (SLICESERVE_SWITCH_INTERVAL seconds).
- The heap at start-up frozen (gc.freeze): the modules, the model's objects and the compiled
  kernels' caches, some 240,000 objects after the imports alone, would otherwise be walked by
  every full collection the cyclic collector runs while serving (116 ms for those on a CI
  machine's core), a pause of every stream at once. Objects made while serving are collected
  as before.
"""

from __future__ import annotations

import gc
import os
import sys


def settle_for_serving() -> None:
    """Call once everything long-lived is loaded, before serving starts."""
    sys.setswitchinterval(float(os.environ.get("SLICESERVE_SWITCH_INTERVAL", "0.0005")))
    gc.collect()
    gc.freeze()
