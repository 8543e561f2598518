-- name: weight-changes
-- purpose: diff stores: the most changed neurons, heads or parameter tensors between A's and B's weights
-- param: what = neuron
-- param: limit = 20
-- requires: weight_diff, neuron_weight_diff, head_weight_diff
-- neuron: norm of the change of its input rows (gate and up) and output column, ranked by their sum;
-- head: of its slice of the attention output projection; param: ||B - A|| / ||A|| per tensor.
SELECT * FROM (
    SELECT 'neuron' AS what, layer, neuron AS unit, NULL AS param, in_norm + out_norm AS change, in_rel, out_rel
    FROM neuron_weight_diff
    UNION ALL
    SELECT 'head', layer, head, NULL, out_norm, NULL, out_rel FROM head_weight_diff
    UNION ALL
    SELECT 'param', layer, NULL, param, rel_norm, NULL, NULL FROM weight_diff
)
WHERE what = $what
ORDER BY change DESC NULLS LAST, layer, unit, param
LIMIT $limit;
