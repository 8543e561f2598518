-- name: neuron-diff
-- purpose: diff stores: neurons whose activations changed most between A and B (mean |B - A|, correlation)
-- param: hook = mlp.hook_post
-- param: layer = -1
-- param: order = mean_abs_diff
-- param: limit = 20
-- requires: neuron_diff
-- order = mean_abs_diff (largest change first) | corr (least correlated first) | overlap (top-k sets
-- that share the fewest tokens first). top_overlap = share of A's top-k tokens also in B's top-k.
SELECT hook, layer, neuron, mean_abs_diff, corr, top_overlap, mean_a, mean_b, std_a, std_b
FROM neuron_diff
WHERE hook = $hook AND ($layer < 0 OR layer = $layer)
ORDER BY
    CASE $order
        WHEN 'mean_abs_diff' THEN -mean_abs_diff
        WHEN 'corr' THEN corr
        WHEN 'overlap' THEN top_overlap
        ELSE error('order must be mean_abs_diff, corr or overlap')
    END NULLS LAST,
    layer,
    neuron
LIMIT $limit;
