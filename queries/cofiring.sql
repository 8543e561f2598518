-- name: cofiring
-- purpose: neuron pairs that fire on the same sampled tokens (`mine analyze STORE cofire`), by Jaccard; neuron=N: pairs with N
-- param: hook = mlp.hook_post
-- param: layer = -1
-- param: neuron = -1
-- param: limit = 20
-- requires: cofiring
-- A neuron fires on a token when its value is above 0 and above its own 90th percentile over the
-- sample (see --quantile). jaccard = both / (fires_a + fires_b - both); corr: Pearson of the values.
SELECT
    layer,
    neuron_a,
    neuron_b,
    jaccard,
    corr,
    "both",
    n
FROM cofiring
WHERE
    hook = $hook
    AND ($layer < 0 OR layer = $layer)
    AND ($neuron < 0 OR neuron_a = $neuron OR neuron_b = $neuron)
ORDER BY jaccard DESC, layer, neuron_a, neuron_b
LIMIT $limit;
