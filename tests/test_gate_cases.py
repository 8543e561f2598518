"""GateCases against brute force: random shards, merged in random orders, exact counts and top-k."""

import numpy as np
import torch

from mining.reducers.gate_cases import CASES, POSITIVE_CASE, GateCases


def test_gate_cases_match_brute_force():
    rng = np.random.default_rng(0)
    M, N, k = 900, 7, 4
    gate = torch.from_numpy(rng.normal(size=(M, N)).astype(np.float32))
    up = torch.from_numpy(rng.normal(size=(M, N)).astype(np.float32))
    gate[::17] = 0.0  # exact zeros count as "not > 0"
    x = torch.nn.functional.silu(gate) * up
    tok = torch.arange(M, dtype=torch.int64)
    cuts = np.sort(rng.choice(np.arange(1, M), 5, replace=False))
    parts = []
    for lo, hi in zip([0, *cuts], [*cuts, M]):
        g = GateCases(k)
        for a in range(lo, hi, 50):
            b = min(a + 50, hi)
            g.update(x[a:b], gate[a:b], up[a:b], tok[a:b])
        parts.append(GateCases.from_state_dict(g.state_dict()))
    order = rng.permutation(len(parts))
    merged = parts[order[0]]
    for i in order[1:]:
        merged = merged.merge(parts[i])
    out = merged.finalize()
    case = (gate > 0).numpy().astype(int) * 2 + (up > 0).numpy().astype(int)
    xn = x.numpy()
    for c, _, _ in CASES:
        hit = case == c
        np.testing.assert_array_equal(out["count"][c], hit.sum(0))
        np.testing.assert_allclose(out["mean"][c], np.where(hit, xn, 0).sum(0) / np.maximum(hit.sum(0), 1),
                                   rtol=1e-6, atol=1e-9)
        values, toks = (t.numpy() for t in out["top"][c])
        for n in range(N):
            idx = np.nonzero(hit[:, n])[0]
            key = -xn[idx, n] if POSITIVE_CASE[c] else xn[idx, n]
            best = idx[np.lexsort((idx, key))][:k]
            np.testing.assert_array_equal(toks[: len(best), n], best)
            np.testing.assert_array_equal(values[: len(best), n], xn[best, n])
            assert (np.sign(xn[best, n]) >= 0).all() if POSITIVE_CASE[c] else (xn[best, n] <= 0).all()
