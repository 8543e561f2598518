-- name: dead-and-dense
-- purpose: neurons that never fire (kind dead) or fire on almost every token (kind dense), limit per kind
-- param: limit = 20
-- param: hook = mlp.hook_post
-- param: threshold = 0.99
SELECT
    CASE WHEN frac_active = 0 THEN 'dead' ELSE 'dense' END AS kind,
    hook,
    layer,
    neuron,
    frac_active,
    mean,
    std,
    min,
    max
FROM neurons
WHERE hook = $hook AND (frac_active = 0 OR frac_active >= $threshold)
QUALIFY row_number() OVER (PARTITION BY kind ORDER BY frac_active DESC, layer, neuron) <= $limit
ORDER BY kind, frac_active DESC, layer, neuron;
