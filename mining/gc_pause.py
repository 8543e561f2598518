"""Pause Python's cyclic garbage collector while a process imports torch and transformers and loads a model.

Those steps allocate about a million objects that live as long as the process. The collector, seeing the heap
grow, runs full passes over it again and again: 18-24% of the time to import torch, transformers, a Llama's
modelling code and Ray on a 2-core host (1.1-2.3 of 6-10 s, timed with gc.callbacks; 5-7 of 17-21 s in its
slowest hour). Nothing in them needs collecting (a few hundred objects in cycles), so the collector waits until
they are done, then carries on as before.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
