"""The byte shuffle of the stored reducer states (store.encode_states): byte k of element i goes to k * n + i, the
layout of numcodecs' and Blosc's Shuffle, so that counts, token indices and floats compress far better.

numcodecs' Shuffle walks a byte at a time and holds the GIL. These loops for 4- and 8-byte elements build or
split a whole element per step, which vectorises: 1.5x numcodecs' speed on one thread (scripts/bench_states.py).
They are serial and release the GIL, so the store runs a shard's large tensors side by side on threads
(`each_large`), as many as torch has: numba's parallel kernels may not be launched from two threads at once under
its workqueue layer, and an actor writes two shards at once on a GPU (ray_pool.write_slots). Other element sizes,
and a missing numba, take numcodecs' loop: the same bytes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; numcodecs' loop still works without it
    njit = None

LARGE = 1 << 20
"""Bytes from which a tensor's shuffle goes to a thread of its own: below, the hand-off costs more than it saves."""

if njit is not None:
    _opts = dict(boundscheck=False, nogil=True, cache=True)
    # One pair per word size: the byte loop's constant trip count is what lets LLVM unroll it and vectorise over i.

    @njit(**_opts)
    def _split8(x, planes):  # pragma: no cover - compiled
        """x (n,) uint64 -> planes (8, n) uint8, planes[k, i] = byte k of x[i]."""
        for i in range(x.size):
            v = x[i]
            for k in range(8):
                planes[k, i] = np.uint8((v >> np.uint64(8 * k)) & np.uint64(0xFF))

    @njit(**_opts)
    def _join8(planes, out):  # pragma: no cover - compiled
        """planes (8, n) uint8 -> out (n,) uint64: _split8's inverse."""
        for i in range(out.size):
            v = np.uint64(0)
            for k in range(8):
                v |= np.uint64(planes[k, i]) << np.uint64(8 * k)
            out[i] = v

    @njit(**_opts)
    def _split4(x, planes):  # pragma: no cover - compiled
        for i in range(x.size):
            v = x[i]
            for k in range(4):
                planes[k, i] = np.uint8((v >> np.uint32(8 * k)) & np.uint32(0xFF))

    @njit(**_opts)
    def _join4(planes, out):  # pragma: no cover - compiled
        for i in range(out.size):
            v = np.uint32(0)
            for k in range(4):
                v |= np.uint32(planes[k, i]) << np.uint32(8 * k)
            out[i] = v

    _LOOPS = {8: (np.uint64, _split8, _join8), 4: (np.uint32, _split4, _join4)}
else:  # pragma: no cover
    _LOOPS = {}


def _loops(data: np.ndarray, size: int) -> tuple | None:
    """(word type, split, join) for data (flat uint8) of `size`-byte elements, or None where numcodecs' loop serves."""
    loops = _LOOPS.get(size)
    return loops if loops is not None and data.size % size == 0 and data.ctypes.data % size == 0 else None


def shuffle_into(raw: np.ndarray, size: int, out: np.ndarray) -> None:
    """The shuffled bytes of raw (flat uint8, elements of `size` bytes) written to out (flat uint8, as long)."""
    loops = _loops(raw, size)
    if loops is None:
        from numcodecs import Shuffle

        Shuffle(size).encode(raw, out=out)
        return
    word, split, _ = loops
    split(raw.view(word), out.reshape(size, -1))


def unshuffle(planes: np.ndarray, size: int) -> np.ndarray:
    """The element bytes of `size` byte planes (flat uint8), as a fresh flat uint8 array."""
    out = np.empty(planes.size, np.uint8)
    loops = _loops(out, size)
    if size == 1 or planes.size == 0:
        out[:] = planes
    elif loops is None:
        from numcodecs import Shuffle

        Shuffle(size).decode(planes, out=out)
    else:
        word, _, join = loops
        join(planes.reshape(size, -1), out.view(word))
    return out


def each_large(fn: Callable[[int], None], sizes: Sequence[int], threads: int) -> None:
    """fn(i) for every i, those whose sizes[i] is at least LARGE bytes on up to `threads` threads (the loops above
    release the GIL), the rest here; returns when all are done, raising the first error."""
    large = [i for i, n in enumerate(sizes) if n >= LARGE]
    if threads <= 1 or len(large) < 2:
        for i in range(len(sizes)):
            fn(i)
        return
    small = [i for i, n in enumerate(sizes) if n < LARGE]
    with ThreadPoolExecutor(max_workers=min(threads, len(large))) as pool:
        done = [pool.submit(fn, i) for i in large]
        for i in small:
            fn(i)
        for future in done:
            future.result()
