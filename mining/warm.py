"""Compile the CPU kernels into numba's on-disk cache once, at install time (`python3 -m mining.warm`, which
scripts/setup.sh runs).

The kernels (reducers/kernels.py, reducers/layer_kernel.py, byteshuffle.py) are compiled on first use and cached
beside their source. On a fresh install every process that mines before that cache exists compiles them all
again: both actors of the demo, the test suite's three workers and the Ray actors of their first jobs, each
taking about 50 s of a core. Here one process mines one shard of a tiny random Llama with every statistic that
runs a kernel (top-k, top contexts, histograms, moments, DLA, polysemanticity), merges two shards' states, writes
and reads them, then feeds each reducer on its own: the real code paths, so the cached signatures are the ones a
job asks for (tests/test_warm.py checks every cached kernel gets one).
"""

from __future__ import annotations

import sys
import time


def warm() -> float:
    """Mine a tiny shard through every kernel; the seconds it took."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .engine import ShardMiner, frequent_tokens
    from .models import LoadedModel, load_tokenizer, quiet_transformers, resolve_source
    from .reducers import kernels
    from .runner import plan
    from .spec import ModelSpec, spec_from_dict
    from .store import decode_states, encode_states
    from .tiny import tiny_model

    if kernels.numba is None:  # pragma: no cover - numba is a dependency
        return 0.0
    start = time.perf_counter()
    quiet_transformers()  # no progress bars in the set-up's output
    bundled = ModelSpec(id="smollm2-135m")
    tokenizer = load_tokenizer(bundled)  # also converts the bundled GGUF once, for the demo and the tests
    spec = spec_from_dict({
        "name": "warm", "model": {"id": "tiny-llama"},
        "corpus": {"source": "builtin:python-docs", "max_tokens": 512, "context_length": 64},
        "hooks": ["blocks.*.mlp.hook_post"],
        "stats": {"top_k": 4, "dla": True, "polysemanticity": True, "token_groups": 8},
        "compute": {"batch_size": 4, "shard_tokens": 256},
    })
    model = tiny_model("llama", vocab_size=len(tokenizer)).eval()
    loaded = LoadedModel(model, tokenizer, resolve_source(bundled), model.device, model.dtype, True)
    shards, _ = plan(spec, tokenizer)
    miner = ShardMiner(spec, loaded, frequent_tokens(shards, spec.stats.token_groups))
    results = [miner.mine(shard) for shard in shards[:2]]
    for name, stats in results[0].stats.items():
        merged = stats.merge(results[1].stats[name])
        decode_states(encode_states(merged.state_dict()))
    _each_reducer()
    return time.perf_counter() - start


def _each_reducer() -> None:
    """Each reducer's own kernel, which a batch takes where the one-pass kernel does not apply (a top-k not yet
    settled, quantile samples, tests feeding one reducer); twice, so the top-k is settled the second time."""
    import numpy as np
    import torch

    from .reducers import ContextTopK, Histogram, HistogramBins, Moments, TopK
    from .reducers.layer_kernel import gain_product

    x = torch.randn(4, 64, 96, generator=torch.Generator().manual_seed(0))
    tok = torch.arange(4 * 64).view(4, 64)
    flat, flat_tok = x.view(-1, 96), tok.view(-1)
    top, bottom, contexts = TopK(4), TopK(4, largest=False), ContextTopK(4)
    histogram, moments = Histogram(HistogramBins()), Moments()
    for _ in range(2):
        top.update(flat, flat_tok)
        bottom.update(flat, flat_tok)
        contexts.update(x, tok)
        histogram.update(flat)
        moments.update(flat)
    sel = np.arange(len(flat), dtype=np.int64)
    gain_product(flat, sel, torch.ones(1, 96), np.zeros(len(flat), np.int64), torch.empty(len(flat), 96))


def main() -> int:
    from .errors import UserError

    try:
        seconds = warm()
    except UserError as e:  # the bundled model's package missing, say
        print(f"mining.warm: {e}", file=sys.stderr)
        return 1
    print(f"mining.warm: CPU kernels compiled and cached ({seconds:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
