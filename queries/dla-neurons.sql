-- name: dla-neurons
-- purpose: neurons whose mean direct logit attribution to the actual next token is largest (sign=negative: most harmful)
-- param: hook = mlp.hook_post
-- param: sign = positive
-- param: layer = -1
-- param: limit = 20
-- requires: dla_neurons
SELECT
    layer,
    neuron,
    mean_dla,
    std_dla,
    frac_positive,
    min_dla,
    max_dla,
    count
FROM dla_neurons
WHERE hook = $hook AND ($layer < 0 OR layer = $layer)
ORDER BY CASE WHEN $sign = 'negative' THEN mean_dla ELSE -mean_dla END, layer, neuron
LIMIT $limit;
