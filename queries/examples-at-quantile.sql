-- name: examples-at-quantile
-- purpose: examples sampled uniformly within a quantile band of one neuron (kind: all | firing | frac_max)
-- param: layer
-- param: neuron
-- param: band = 90-95
-- param: kind = all
-- param: hook = mlp.hook_post
-- requires: quantile_samples
SELECT
    s.kind,
    s.band,
    s.rank,
    s.value,
    s.tok,
    s.exact,
    tok_context(s.tok, 12) AS context
FROM quantile_samples AS s
WHERE s.hook = $hook AND s.layer = $layer AND s.neuron = $neuron AND s.kind = $kind AND s.band = $band
ORDER BY s.rank;
