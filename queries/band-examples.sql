-- name: band-examples
-- purpose: a few sampled examples from each quantile band of one neuron, with context and character span (kind: all | firing | frac_max)
-- param: layer
-- param: neuron
-- param: hook = mlp.hook_post
-- param: kind = all
-- param: per_band = 2
-- requires: quantile_samples
SELECT
    s.band,
    s.band_index,
    s.band_lo,
    s.band_hi,
    s.rank,
    s.value,
    s.tok,
    t.ctx,
    t.doc_id,
    t.char_start,
    t.char_end,
    t.token
FROM quantile_samples AS s
INNER JOIN tokens AS t ON t.tok = s.tok
WHERE s.hook = $hook AND s.layer = $layer AND s.neuron = $neuron AND s.kind = $kind AND s.rank <= $per_band
ORDER BY s.band_index, s.rank;
