-- name: examples-at-quantile
-- purpose: examples sampled uniformly within a quantile band of one neuron (kind: all | firing | frac_max)
-- param: layer
-- param: neuron
-- param: band = 90-95
-- param: kind = all
-- param: hook = mlp.hook_post
-- requires: quantile_samples
WITH s AS (
    SELECT kind, band, rank, value, tok, exact
    FROM quantile_samples
    WHERE hook = $hook AND layer = $layer AND neuron = $neuron AND kind = $kind AND band = $band
)

SELECT
    s.kind,
    s.band,
    s.rank,
    s.value,
    s.tok,
    s.exact,
    c.context
FROM s
LEFT JOIN tok_contexts((SELECT list(tok) FROM s), 12) AS c ON c.tok = s.tok
ORDER BY s.rank;
