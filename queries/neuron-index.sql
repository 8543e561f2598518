-- name: neuron-index
-- purpose: every neuron with its summary metrics and median, for viewers (layer = -1 / limit = -1: all)
-- param: hook = mlp.hook_post
-- param: layer = -1
-- param: limit = -1
SELECT
    n.hook,
    n.layer,
    n.neuron,
    n.count,
    n.mean,
    n.std,
    n.skew,
    n.kurtosis,
    n.frac_active,
    n.min,
    n.max,
    q.value AS p50,
    q.value_firing AS firing_p50
FROM neurons AS n
LEFT JOIN neuron_quantiles($hook, $layer, 0.5) AS q
    ON n.hook = q.hook AND n.layer = q.layer AND n.neuron = q.neuron
WHERE n.hook = $hook AND ($layer < 0 OR n.layer = $layer)
ORDER BY n.layer, n.neuron
LIMIT (CASE WHEN $limit < 0 THEN NULL ELSE $limit END);
