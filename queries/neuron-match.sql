-- name: neuron-match
-- purpose: diff stores: for each neuron of A, the best-correlated neuron of B in the same layer (or B's layer at the same relative depth)
-- param: layer = -1
-- param: order = worst
-- param: limit = 20
-- requires: neuron_match
-- corr = correlation with its best match; self_corr = with the B neuron of the same index (NULL for
-- models of other sizes, whose layers are paired by relative depth: layer_b = B's layer).
-- worst: the A neurons with no good counterpart first; best: the clearest correspondences first.
SELECT hook, layer_a, neuron_a, layer_b, neuron_b, corr, self_corr
FROM neuron_match
WHERE $layer < 0 OR layer_a = $layer
ORDER BY CASE WHEN $order = 'best' THEN -corr ELSE corr END NULLS FIRST, layer_a, neuron_a
LIMIT $limit;
