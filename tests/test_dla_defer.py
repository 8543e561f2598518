"""The engine's deferred DLA (the CPU path): the hook takes gain[target] * a into reused buffers and the values
come out the same bits as DlaBatch's torch path computes them, batch after batch, without fresh (M, N) tensors."""

from types import SimpleNamespace

import numpy as np
import torch

from mining.dla import DirectLogitAttribution, DlaBatch, GainCache, GainProduct
from mining.hooks import HookPoint
from mining.tiny import tiny_model


def _batch(rng: np.random.Generator, B: int, T: int, vocab: int, full: bool) -> SimpleNamespace:
    """full: every position mined, with a next token (the largest batch: the buffers' size from then on)."""
    toks = np.where(full | (rng.random((B, T)) < 0.8), rng.integers(0, 10**6, (B, T)), -1)
    targets = np.where(full | (rng.random((B, T)) < 0.9), rng.integers(0, vocab, (B, T)), -1)
    return SimpleNamespace(toks_np=toks, targets_np=targets, toks=torch.from_numpy(toks))


@torch.inference_mode()
def test_deferred_dla_is_the_torch_path_bit_for_bit_in_reused_buffers():
    model = tiny_model("llama", vocab_size=300)
    dla = DirectLogitAttribution(model)
    N = model.config.intermediate_size
    points = [HookPoint(f"blocks.{L}.mlp.hook_post", "mlp.hook_post", L, "", "input", N) for L in range(2)]
    rng = np.random.default_rng(0)
    seen: dict[str, int] = {}
    for i, shape in enumerate(((4, 9), (3, 9), (4, 9), (4, 9))):  # a full batch, a smaller one, then others
        batch = _batch(rng, *shape, vocab=300, full=i == 0)
        fast, ref = DlaBatch(dla, batch, defer=True), DlaBatch(dla, batch, defer=False)
        for point in points:
            x = torch.randn(*shape, N)
            fast.gain(point, x)
            ref.gain(point, x)
        fast.scale = ref.scale = torch.rand(len(fast.sel_np)) + 0.5
        want = dict(ref.finish())
        for name, got in fast.finish():
            assert isinstance(got, GainProduct)
            assert torch.equal(got.values(), want[name])
            seen.setdefault(name, got.u.untyped_storage().data_ptr())
            assert got.u.untyped_storage().data_ptr() == seen[name]  # the same memory every batch
    assert len(seen) == 2


@torch.inference_mode()
def test_gain_cache_keeps_the_bits_and_multiplies_out_only_new_targets():
    """GainCache: later batches take kept rows for the targets an earlier batch of the shard multiplied out, and the
    values stay the torch path's bits, through a cache that fills up mid-shard, a new shard, and a layer that missed a
    batch (it stops using the cache for the rest of the shard)."""
    model = tiny_model("llama", vocab_size=300)
    dla = DirectLogitAttribution(model)
    N = model.config.intermediate_size
    dla.cache = GainCache(layers=2, width=N, budget=2 * N * 4 * 40)  # room for 40 of the 80 targets below
    points = [HookPoint(f"blocks.{L}.mlp.hook_post", "mlp.hook_post", L, "", "input", N) for L in range(2)]
    rows: list[int] = []
    real = dla.neuron_gain
    dla.neuron_gain = lambda layer, d, out=None: (rows.append(len(d)), real(layer, d, out))[1]
    rng = np.random.default_rng(1)
    for i in range(7):
        if i == 4:
            dla.cache.start_shard()
        batch = _batch(rng, 4, 9, vocab=80, full=i == 0)
        fast, ref = DlaBatch(dla, batch, defer=True), DlaBatch(dla, batch, defer=False)
        xs = [torch.randn(4, 9, N) for _ in points]
        rows.clear()
        for point, x in zip(points, xs):
            if not (i == 5 and point.layer == 1):  # layer 1 misses batch 5: its kept rows fall behind
                fast.gain(point, x)
        if i in (1, 2, 3):  # later batches of the shard multiply out fewer rows than they have distinct targets
            assert 0 < max(rows) < len(fast.directions)
        for point, x in zip(points, xs):
            ref.gain(point, x)
        assert len(dla.cache.slot_of) <= 40
        fast.scale = ref.scale = torch.rand(len(fast.sel_np)) + 0.5
        want = dict(ref.finish())
        for name, got in fast.finish():
            assert torch.equal(got.values(), want[name]), (i, name)
    assert dla.cache.filled[1] < dla.cache.filled[0]  # layer 1 stopped at batch 5


@torch.inference_mode()
def test_a_gain_row_is_the_same_bits_in_a_matmul_of_any_size():
    """What GainCache rests on, on this host's BLAS: a target's gain row does not depend on how many other rows its
    matmul had, nor where among them it sat (MKL on AVX-512 gave the last rows of a 1-11 row matmul other bits, and
    a row alone is a gemv everywhere: dla.GAIN_ROWS_MIN pads them)."""
    from mining.tiny import tiny_model

    model = tiny_model("llama", vocab_size=300, hidden_size=96, intermediate_size=256)
    dla = DirectLogitAttribution(model)
    d = dla.directions(torch.arange(300))
    every = dla.neuron_gain(0, d)
    for rows in range(1, 41):
        for at in (0, 1, 7, 250):
            assert torch.equal(dla.neuron_gain(0, d[at:at + rows].clone()), every[at:at + rows]), (rows, at)
            out = torch.full((rows, every.shape[1]), float("nan"))
            assert torch.equal(dla.neuron_gain(0, d[at:at + rows].clone(), out), every[at:at + rows]), (rows, at)


def test_statistics_kernel_writes_the_numerator_gain_product_would():
    """The statistics kernel writes DLA's numerator while it reads a layer (layer_kernel.Numerator): the bits
    gain_product gives, on exactly the mined rows that have a DLA row, from kept and fresh gain rows."""
    from mining.reducers import layer_kernel

    rng = np.random.default_rng(3)
    B, T, N, k = 3, 11, 70, 4
    x = torch.from_numpy(rng.standard_normal((B, T, N)).astype(np.float32))
    toks = np.where(rng.random((B, T)) < 0.8, np.arange(B * T).reshape(B, T), -1)
    mined_pos = np.flatnonzero(toks.reshape(-1) >= 0)
    sel = np.sort(rng.choice(mined_pos, size=len(mined_pos) - 5, replace=False))  # some mined rows have no target
    urow = np.full(len(mined_pos), -1, np.int64)
    urow[np.searchsorted(mined_pos, sel)] = np.arange(len(sel))
    kept, fresh = torch.randn(6, N), torch.randn(3, N)
    src = rng.integers(-3, 6, len(sel))  # negative: fresh rows
    want = layer_kernel.gain_product(x, sel, kept, src, torch.empty(len(sel), N), fresh)
    got = layer_kernel.Numerator(urow, kept, fresh, src, torch.full((len(sel), N), float("nan")))
    empty = torch.full((k, N), -2**63, dtype=torch.int64)
    layer_kernel.layer_update(x, torch.from_numpy(toks >= 0), torch.from_numpy(toks), (empty.clone(), None),
                              (empty.clone(), None), None, None, len(mined_pos), product=got)
    assert got.done
    assert torch.equal(got.u, want)
