"""The accelerator paths (reducers/device.py), run on the CPU with MINING_DEVICE_PATH=1: the same
states as the CPU paths and brute force, bit for bit, on hostile data, in float32 and bfloat16, with
floors, sparse batches, and an overflowing candidate buffer that is reported, not silently lossy."""

import numpy as np
import pytest
import torch

from mining.reducers import ContextTopK, Histogram, HistogramBins, Moments, TopK
from mining.reducers import device
from mining.reducers.moments import _batch_moments

from test_kernels import hostile
from test_reducers import brute_contexts, brute_topk, same_state


@pytest.fixture
def device_path(monkeypatch):
    monkeypatch.setenv("MINING_DEVICE_PATH", "1")


def toks_for(M: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).permutation(10 * M)[:M].astype(np.int64))


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ordered_image_is_monotone_and_matches_float32(seed, dtype):
    x = hostile(seed, 64, 40).to(dtype)
    o = device.widen(device.ordered(x))
    ref = device.widen(device.ordered(x.float()))
    assert torch.equal(o, ref)  # bfloat16's 16-bit image, widened, is the float32 one
    f = x.float().flatten()
    ok = ~f.isnan()
    a, b = f[ok][:, None], f[ok][None, :]
    oa, ob = o.flatten()[ok][:, None], o.flatten()[ok][None, :]
    assert torch.equal(a < b, oa < ob) and torch.equal(a == b, oa == ob)
    assert bool((o.flatten()[~ok] == device.INT32_MIN).all())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_device_path_is_exact(seed, dtype, device_path):
    x = hostile(seed, 400, 70).to(dtype)
    tok = toks_for(400, seed)
    for largest in (True, False):
        t = TopK(5, largest)
        caps = []
        for lo in range(0, 400, 50):  # the first batch dense, the rest sparse
            caps.append(t.sparse_capacity(50, 70))
            t.update(x[lo:lo + 50], tok[lo:lo + 50], check=False)
        assert caps[0] is None and caps[-1] is not None
        assert not t.overflowed()
        values, toks = brute_topk(x.float().numpy(), tok.numpy(), 5, largest)
        got_v, got_t = t.finalize()
        assert np.array_equal(got_t.numpy(), toks)
        assert np.array_equal(got_v.numpy(), values)


def test_topk_device_path_with_floor_equals_cpu(device_path, monkeypatch):
    """A floor from another shard: sparse from the first batch, the CPU path's state bit for bit. (Ties
    with a floor of higher toks all enter: hostile()'s constant columns would fill the buffer.)"""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 50, generator=gen).bfloat16().float()  # bfloat16 values: some ties
    tok = toks_for(300, 3)
    other = TopK(4)
    other.update(torch.randn(300, 50, generator=gen), toks_for(300, 4) + 10_000, check=False)
    fast = TopK(4)
    fast.set_floor(other.threshold(), rows=300)
    assert fast.sparse_capacity(60, 50) is not None
    for lo in range(0, 300, 60):
        fast.update(x[lo:lo + 60], tok[lo:lo + 60], check=False)
    monkeypatch.delenv("MINING_DEVICE_PATH")
    ref = TopK(4)
    ref.set_floor(other.threshold(), rows=300)
    for lo in range(0, 300, 60):
        ref.update(x[lo:lo + 60], tok[lo:lo + 60], check=False)
    assert not fast.overflowed()
    assert torch.equal(fast.keys, ref.keys)
    assert torch.equal(fast.merge(other).keys, ref.merge(other).keys)


def test_overflowing_candidate_buffer_is_flagged(device_path, monkeypatch):
    x = hostile(5, 200, 30)
    tok = toks_for(200, 5)
    t = TopK(3)
    t.update(x[:100], tok[:100], check=False)
    monkeypatch.setattr(TopK, "sparse_capacity", lambda self, M, N: 4)  # far too small
    t.update(x[100:], tok[100:], check=False)
    assert t.overflowed()


def test_merge_sparse_keeps_each_columns_best():
    from mining.reducers.topk import EMPTY

    rng = np.random.default_rng(0)
    state = torch.sort(torch.from_numpy(rng.integers(-1000, 1000, (4, 6))), dim=0, descending=True).values
    keys = torch.from_numpy(rng.permutation(np.arange(2000, 2030)).astype(np.int64))
    cols = torch.from_numpy(rng.integers(0, 7, 30))  # 6 = padding
    keys[cols == 6] = EMPTY
    got = device.merge_sparse(state, keys, cols, 4)
    for n in range(6):
        both = torch.cat([state[:, n], keys[cols == n]])
        assert torch.equal(got[:, n], torch.sort(both, descending=True).values[:4])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contexts_device_path_is_exact(seed, dtype, device_path):
    B, T, N = 12, 9, 40
    x = hostile(seed, B * T, N).view(B, T, N).to(dtype)
    rng = np.random.default_rng(seed)
    toks = (np.arange(B * T).reshape(B, T) * 3 + 1).astype(np.int64)
    toks[rng.random((B, T)) < 0.2] = -1  # unmined positions
    toks[3] = -1  # a context with nothing mined
    x[5, :, 7] = float("-inf")  # an all -inf context peaks at its first mined tok
    c = ContextTopK(4)
    for lo in range(0, B, 5):
        c.update(x[lo:lo + 5], torch.from_numpy(toks[lo:lo + 5]), check=False, rising=True)
    values, out = brute_contexts(x.float().numpy(), toks, 4)
    got_v, got_t = c.finalize()
    assert np.array_equal(got_t.numpy(), out)
    assert np.array_equal(got_v.numpy(), values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_histogram_device_path_equals_cpu(dtype, monkeypatch):
    x = hostile(6).to(dtype)
    for bins in (HistogramBins(), HistogramBins(0, -3, 2)):
        ref = Histogram(bins)
        ref.update(x.float())
        monkeypatch.setenv("MINING_DEVICE_PATH", "1")
        fast = Histogram(bins)
        fast.update(x[:100])
        fast.update(x[100:])
        monkeypatch.delenv("MINING_DEVICE_PATH")
        assert torch.equal(fast.finalize(), ref.finalize())
        assert same_state(fast.state_dict(), ref.state_dict())


def test_moments_device_chunks_equal_cpu(monkeypatch):
    x = hostile(7, 500, 60)
    ref = _batch_moments(x)
    monkeypatch.setattr("mining.reducers.moments.CHUNK_ELEMENTS", 60 * 500)  # whole batch, as on a GPU
    got = _batch_moments(x)
    for k in ("mean", "m2", "m3", "m4", "min", "max"):
        assert torch.allclose(got[k], ref[k], rtol=1e-9, equal_nan=True), k
    a, b = Moments(), Moments()
    a.update(x.bfloat16())  # a bfloat16 batch is summed in float64 like its float32 copy
    b.update(x.bfloat16().float())
    for k, v in a.finalize().items():
        assert np.allclose(v, b.finalize()[k], rtol=1e-9, equal_nan=True), k


# ---------------------------------------------------------------- the miner on the device path


def mine_all(spec, loaded, shards):
    from mining.engine import ShardMiner

    miner = ShardMiner(spec, loaded)
    out = []
    for shard in shards:  # floors from the stored shards, as an actor does
        out.append(miner.mine(shard))
        miner.raise_floors(out[-1])
    return out


def same_results(a, b) -> None:
    for ra, rb in zip(a, b, strict=True):
        for name, st in ra.stats.items():
            sa, sb = st.state_dict(), rb.stats[name].state_dict()
            assert sa.keys() == sb.keys()
            for key in sa:
                if key.split(".")[0] in ("moments", "dla_moments") or key.startswith("gate_cases.mean"):
                    assert torch.allclose(sa[key].double(), sb[key].double(), rtol=1e-9, equal_nan=True), key
                else:
                    assert torch.equal(sa[key], sb[key]), key
        assert ra.tokens.equals(rb.tokens)
        assert ra.dense.keys() == rb.dense.keys()
        for name, (t, v) in ra.dense.items():
            assert np.array_equal(t, rb.dense[name][0]) and np.array_equal(v, rb.dense[name][1])


def test_miner_on_the_device_path_equals_the_cpu_path(tiny_job, monkeypatch):
    spec, loaded, shards = tiny_job
    assert len(shards) >= 3
    ref = mine_all(spec, loaded, shards)
    monkeypatch.setenv("MINING_DEVICE_PATH", "1")
    same_results(mine_all(spec, loaded, shards), ref)


def test_an_overflow_remines_the_shard_densely(tiny_job, monkeypatch):
    spec, loaded, shards = tiny_job
    ref = mine_all(spec, loaded, shards[:2])
    monkeypatch.setenv("MINING_DEVICE_PATH", "1")
    capacity = TopK.sparse_capacity
    monkeypatch.setattr(TopK, "sparse_capacity", lambda self, M, N, margin=4: capacity(self, M, N) and 2)
    calls = []
    from mining.engine import ShardMiner

    original = ShardMiner._mine
    monkeypatch.setattr(ShardMiner, "_mine", lambda self, shard, sparse: calls.append(sparse) or original(self, shard, sparse))
    same_results(mine_all(spec, loaded, shards[:2]), ref)
    assert False in calls  # at least one shard was mined again, densely
