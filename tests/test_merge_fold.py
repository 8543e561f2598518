"""The driver's merge without Ray or a model: shards' states folded while the job runs (RunningFold)
equal merge_shards' left fold bit for bit, whatever order the shards complete in; and the states
folded into one file once all are complete (Store.compact_states) merge to the same bits again. The fold adds
each shard into its accumulator in place (HookStats.merge_): the same bits as the pure merge."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mining.engine import HookStats
from mining.errors import UserError
from mining.merge import RunningFold, merge_shards
from mining.reducers import Histogram, HistogramBins, Moments, TopK
from mining.store import Store

HOOKS = ("blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post")
N_SHARDS = 6


def shard_stats(index: int) -> dict[str, HookStats]:
    rng = np.random.default_rng(index)
    out = {}
    for hook in HOOKS:
        x = torch.from_numpy(rng.standard_normal((40, 7)).astype(np.float32) * (1 + index))
        tok = torch.arange(40, dtype=torch.int64) + 40 * index
        st = HookStats(top=TopK(3), bottom=TopK(3, largest=False), moments=Moments(),
                       histogram=Histogram(HistogramBins(2, -4, 3)))
        st.top.update(x, tok)
        st.bottom.update(x, tok)
        st.moments.update(x)
        st.histogram.update(x)
        out[hook] = st
    return out


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path / "store")
    s.begin({"name": "fold"}, {}, resume=False)
    for i in range(N_SHARDS):
        s.write_shard(SimpleNamespace(index=i, stats=shard_stats(i), tokens=None, dense={}, n_tokens=40, seconds=0.0),
                      {"first_tok": 40 * i})
    return s


def states(merged: dict[str, HookStats]) -> dict[str, torch.Tensor]:
    return {f"{hook}/{k}": t for hook, st in merged.items() for k, t in st.state_dict().items()}


def assert_same_bits(a: dict[str, HookStats], b: dict[str, HookStats]) -> None:
    sa, sb = states(a), states(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        a_bytes, b_bytes = (t.reshape(-1).contiguous().view(torch.uint8) for t in (sa[key], sb[key]))
        assert sa[key].dtype == sb[key].dtype and torch.equal(a_bytes, b_bytes), key


@pytest.mark.parametrize("arrivals", [[0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 4, 2], [2, 0, 1]])
def test_running_fold_equals_the_left_fold(store, arrivals):
    """Shards added in any order (the last case: 3, 4, 5 never arrive: failed) fold to merge_shards'
    bits, the prefix on the thread and the rest in finish(); shards done before the run count too."""
    done = [4] if len(arrivals) == N_SHARDS else []
    fold = RunningFold(store, None, done=done)
    for index in arrivals:
        if index not in done:
            fold.add(index)
    complete = sorted(set(arrivals) | set(done))
    assert_same_bits(fold.finish(complete), merge_shards(store, None, complete))
    # the reference is exact where it must be: the top-k of the union, whatever the order
    values, toks = merge_shards(store, None, list(reversed(complete)))[HOOKS[0]].top.finalize()
    x = torch.cat([torch.from_numpy(np.random.default_rng(i).standard_normal((40, 7)).astype(np.float32) * (1 + i))
                   for i in complete])
    assert torch.equal(values, torch.topk(x, 3, dim=0).values)


def test_a_damaged_shard_stops_the_fold_with_one_line(store):
    path = store.states_path(1)
    path.write_bytes(path.read_bytes()[:-5])
    fold = RunningFold(store, None, done=[])
    for index in range(N_SHARDS):
        fold.add(index)
    with pytest.raises(UserError, match="shard 1's states file does not match its checksum"):
        fold.finish(list(range(N_SHARDS)))
    assert not store.marker(1).exists()  # so that --resume mines it again


def test_compacted_states_merge_to_the_same_bits(store):
    reference = merge_shards(store, None, list(range(N_SHARDS)))
    store.compact_states({hook: st.state_dict() for hook, st in reference.items()}, list(range(N_SHARDS)))
    assert not list((store.root / "_shards").glob("shard-*.states.zst"))
    assert store.merged_shards() == set(range(N_SHARDS))
    assert all(store.shard_done(i) for i in range(N_SHARDS))  # the markers no longer name a states file
    assert_same_bits(merge_shards(store, None, list(range(N_SHARDS))), reference)
    assert not RunningFold(store, None, done=range(N_SHARDS)).active  # nothing to overlap: merge_shards' path
    # a shard mined again (its token file was lost) is already in the merged file: it adds nothing
    store.write_shard(SimpleNamespace(index=2, stats=shard_stats(2), tokens=None, dense={}, n_tokens=40, seconds=0.0),
                      {"first_tok": 80})
    assert_same_bits(merge_shards(store, None, list(range(N_SHARDS))), reference)
    store.compact_states({hook: st.state_dict() for hook, st in reference.items()}, list(range(N_SHARDS)))
    assert not store.states_path(2).exists()


def test_the_in_place_fold_equals_the_pure_merge(store):
    """merge_shards folds the stored shards with merge_ (int32 counts added into one int64 accumulator); the
    pure merge of the same states in memory gives the same bits, and the shards' own states are left as read."""
    expected = shard_stats(0)
    for i in range(1, N_SHARDS):
        expected = {hook: st.merge(shard_stats(i)[hook]) for hook, st in expected.items()}
    got = merge_shards(store, None, list(range(N_SHARDS)))
    assert_same_bits(got, expected)
    assert got[HOOKS[0]].histogram.counts.dtype == torch.int64
    assert int(got[HOOKS[0]].histogram.counts.sum()) == 40 * 7 * N_SHARDS
    first = HookStats.from_state_dict(store.load_states(0)[HOOKS[0]])
    second = HookStats.from_state_dict(store.load_states(1)[HOOKS[0]])
    before = {k: t.clone() for k, t in second.state_dict().items()}
    first.merge_(second)
    assert all(torch.equal(before[k], t) for k, t in second.state_dict().items())


def test_in_place_histogram_counts_past_int32():
    """A shard file keeps counts as int32; the accumulator is int64, so a long job's counts do not wrap."""
    bins = HistogramBins(2, -4, 3)
    big = torch.full((2, bins.n_bins), 2**31 - 1, dtype=torch.int32)
    acc = Histogram.from_state_dict({**bins.state_dict(), "counts": big.clone()})
    for _ in range(3):
        acc.merge_(Histogram.from_state_dict({**bins.state_dict(), "counts": big}))
    assert acc.counts.dtype == torch.int64 and int(acc.counts[0, 0]) == 4 * (2**31 - 1)
    assert torch.equal(big, torch.full_like(big, 2**31 - 1))  # the addend is not touched
    restored = Histogram.from_state_dict({**bins.state_dict(), "counts": big.clone()})
    restored.update(torch.zeros(3, 2))  # a restored state keeps counting, in int64
    assert int(restored.counts[0, bins.zero_bin]) == 2**31 + 2
    with pytest.raises(ValueError, match="different bins"):
        acc.merge_(Histogram(HistogramBins(3, -4, 3)))
