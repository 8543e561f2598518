-- name: heavy-tailed
-- purpose: neurons by excess kurtosis, highest first: rare, strong features (the sign of skew says on which side, min or max how far; layer = -1: all layers; min_frac_active > 0 keeps neurons that do fire)
-- param: limit = 20
-- param: hook = mlp.hook_post
-- param: layer = -1
-- param: min_frac_active = 0
SELECT
    hook,
    layer,
    neuron,
    kurtosis,
    skew,
    mean,
    std,
    frac_active,
    min,
    max
FROM neurons
WHERE hook = $hook AND ($layer < 0 OR layer = $layer) AND kurtosis IS NOT NULL
  AND frac_active >= $min_frac_active
ORDER BY kurtosis DESC, layer, neuron
LIMIT $limit;
