-- name: heavy-tailed
-- purpose: neurons by excess kurtosis, highest first: rare, strong features (layer = -1: all layers)
-- param: limit = 20
-- param: hook = mlp.hook_post
-- param: layer = -1
SELECT
    hook,
    layer,
    neuron,
    kurtosis,
    skew,
    mean,
    std,
    frac_active,
    max
FROM neurons
WHERE hook = $hook AND ($layer < 0 OR layer = $layer) AND kurtosis IS NOT NULL
ORDER BY kurtosis DESC, layer, neuron
LIMIT $limit;
