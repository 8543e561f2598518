"""PairMoments and CrossMoments (diff jobs) against brute force, under any sharding and merge order."""

import numpy as np
import pytest
import torch

from mining.reducers.pair import CrossMoments, PairMoments


def _shards(rng, n):
    cuts = sorted(rng.integers(0, n + 1, int(rng.integers(1, 6))).tolist())
    bounds = [0, *cuts, n]
    return list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("seed", range(3))
def test_pair_moments_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    M, N = 700, 9
    a = rng.normal(size=(M, N)).astype(np.float32) + 50  # far from zero: centering matters
    b = (0.5 * a + rng.normal(size=(M, N))).astype(np.float32)
    b[:, 3] = 1.0  # constant in B: correlation undefined
    b[:, 4] = -a[:, 4]
    parts = []
    for lo, hi in _shards(rng, M):
        r = PairMoments()
        for s in range(lo, hi, 64):
            r.update(torch.from_numpy(a[s:min(hi, s + 64)]), torch.from_numpy(b[s:min(hi, s + 64)]))
        parts.append(PairMoments.from_state_dict(r.state_dict()))
    rng.shuffle(parts)
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    got = merged.finalize()
    ad, bd = a.astype(np.float64), b.astype(np.float64)
    want_corr = [np.corrcoef(ad[:, j], bd[:, j])[0, 1] if j != 3 else np.nan for j in range(N)]
    np.testing.assert_allclose(got["corr"], want_corr, atol=1e-9)
    assert np.isnan(got["corr"][3]) and got["corr"][4] == pytest.approx(-1.0)
    np.testing.assert_allclose(got["mean_abs_diff"], np.abs(bd - ad).mean(0), rtol=1e-12)
    np.testing.assert_allclose(got["std_a"], ad.std(0), rtol=1e-9)
    np.testing.assert_allclose(got["mean_b"], bd.mean(0), rtol=1e-12)


def test_cross_moments_recover_a_permutation():
    rng = np.random.default_rng(5)
    M, N = 500, 30
    a = rng.normal(size=(M, N)).astype(np.float32)
    perm = rng.permutation(N)
    b = a[:, perm] + 0.01 * rng.normal(size=(M, N)).astype(np.float32)  # B neuron j ~ A neuron perm[j]
    parts = []
    for lo, hi in _shards(rng, M):
        r = CrossMoments()
        r.update(torch.from_numpy(a[lo:hi]), torch.from_numpy(b[lo:hi]))
        parts.append(CrossMoments.from_state_dict(r.state_dict()))
    merged = parts[-1]
    for p in reversed(parts[:-1]):
        merged = merged.merge(p)
    want = np.corrcoef(a.T.astype(np.float64), b.T.astype(np.float64))[:N, N:]
    np.testing.assert_allclose(merged.correlation(), want, atol=2e-6)
    best, corr = merged.best_match()
    assert best.tolist() == np.argsort(perm).tolist() and (corr > 0.99).all()
