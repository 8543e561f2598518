"""The engine's deferred DLA (the CPU path): the hook takes gain[target] * a into reused buffers and the values
come out the same bits as DlaBatch's torch path computes them, batch after batch, without fresh (M, N) tensors."""

from types import SimpleNamespace

import numpy as np
import torch

from mining.dla import DirectLogitAttribution, DlaBatch, GainProduct
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
