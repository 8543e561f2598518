"""Variants of the CPU layer kernel (mining/reducers/layer_kernel.py) timed side by side, as the miner calls it.

    python3 scripts/kernel_variants.py [name=path/to/variant_of_layer_kernel.py ...] [--rounds 41] [--layers 30]

Each variant is a copy of layer_kernel.py's source with a change; "as is" is the tree's own. Every hook has its own
states (top/bottom-k with settled thresholds, contexts, histogram, moments) and its own batch, and one round runs
each variant over all the hooks in turn, as a forward pass does: the states and the histogram's pending blocks come
from L3 or memory, not from the cache a single repeated call would leave them in (a one-hook loop measured the
histogram's count at a third of its cost in the miner). Variants alternate within a round, in reversed order every
other round; the host's drift is large (±20% between rounds), so compare medians over tens of rounds. Prints ms a
hook-batch and each variant's median over the tree's.
"""

from __future__ import annotations

import argparse
import time
import types
from pathlib import Path

import numpy as np
import torch

import mining.reducers.layer_kernel as layer_kernel
from mining.reducers import ContextTopK, Histogram, HistogramBins, Moments, TopK, fused


def load_variant(name: str, path: str) -> types.ModuleType:
    """The variant as a module of the package (its relative imports work), compiled under its own path: numba's
    cache is keyed by the source file and the function's own bytecode, not its callees', so a variant compiled as
    layer_kernel.py could leave its machine code where the real module would load it."""
    mod = types.ModuleType("layer_kernel_" + name)
    mod.__dict__.update(__name__="mining.reducers.layer_kernel", __package__="mining.reducers")
    exec(compile(open(path).read(), str(Path(path).resolve()), "exec"), mod.__dict__)
    return mod


def activations(seed: int, B: int, T: int, N: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.silu(torch.randn(B, T, N, generator=g) * (1 + seed % 3) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="*", help="name=path: a variant of layer_kernel.py")
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--layers", type=int, default=30, help="hooks, each with its own states (SmolLM2: 30)")
    ap.add_argument("--shape", type=int, nargs=3, default=(8, 128, 1536), metavar=("B", "T", "N"))
    ap.add_argument("--top-k", type=int, default=32)
    args = ap.parse_args()
    B, T, N = args.shape
    mods = {"as is": layer_kernel}
    for item in args.variants:
        name, path = item.split("=", 1)
        mods[name] = load_variant(name, path)
    tok0 = torch.arange(B * T).view(B, T)
    hooks = []
    for layer in range(args.layers):  # thresholds settled on a few batches first, as an actor's are
        top, bottom, ctx = TopK(args.top_k), TopK(args.top_k, largest=False), ContextTopK(args.top_k)
        for s in range(4):
            x, tok = activations(layer * 7 + s, B, T, N), tok0 + s * B * T
            top.update(x.view(-1, N), tok.view(-1), check=False)
            bottom.update(x.view(-1, N), tok.view(-1), check=False)
            ctx.update(x, tok, check=False, rising=True)
        hooks.append((top, bottom, ctx, Histogram(HistogramBins()), Moments(), activations(1000 + layer, B, T, N)))
    mask = torch.ones(B, T, dtype=torch.bool)
    step = 0

    def one_round(mod: types.ModuleType) -> float:
        nonlocal step
        fused.layer_update = mod.layer_update
        step += 1
        tok = tok0 + (100 + step) * B * T
        start = time.perf_counter()
        for top, bottom, ctx, hist, mom, x in hooks:
            assert fused.update_hook(top, bottom, ctx, hist, mom, x, tok, mask, n_mined=B * T)
        return (time.perf_counter() - start) / len(hooks) * 1e3

    try:
        for mod in mods.values():
            one_round(mod)  # compiles
        times: dict[str, list[float]] = {name: [] for name in mods}
        for r in range(args.rounds):
            order = list(mods.items())
            for name, mod in order if r % 2 == 0 else order[::-1]:
                times[name].append(one_round(mod))
    finally:
        fused.layer_update = layer_kernel.layer_update
    base = float(np.median(times["as is"]))
    print(f"{args.rounds} rounds, {args.layers} hooks of {B} x {T} x {N} float32, ms a hook-batch:")
    for name, t in times.items():
        med = float(np.median(t))
        print(f"{name:>12}: best {min(t):.2f}, q25 {np.percentile(t, 25):.2f}, median {med:.2f}"
              f" ({med / base:.3f} of as is)")


if __name__ == "__main__":
    main()
