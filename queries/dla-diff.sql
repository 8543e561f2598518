-- name: dla-diff
-- purpose: diff stores: neurons or heads whose mean direct logit attribution changed most from A to B
-- param: what = neuron
-- param: limit = 20
-- requires: dla_diff, head_dla_diff
-- diff = mean DLA in B - mean DLA in A (to the actual next token, final-norm scale of each model);
-- ranked by |diff|. what = neuron | head.
SELECT * FROM (
    SELECT 'neuron' AS what, layer, neuron AS unit, mean_dla_a, mean_dla_b, diff FROM dla_diff
    UNION ALL
    SELECT 'head', layer, head, mean_dla_a, mean_dla_b, diff FROM head_dla_diff
)
WHERE what = $what
ORDER BY abs(diff) DESC NULLS LAST, layer, unit
LIMIT $limit;
