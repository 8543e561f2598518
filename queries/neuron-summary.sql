-- name: neuron-summary
-- purpose: one neuron's moments, activity and quantiles (p01..p99; firing-only median and p90)
-- param: layer
-- param: neuron
-- param: hook = mlp.hook_post
SELECT
    n.*,
    neuron_quantile($hook, $layer, $neuron, 0.01) AS p01,
    neuron_quantile($hook, $layer, $neuron, 0.1) AS p10,
    neuron_quantile($hook, $layer, $neuron, 0.25) AS p25,
    neuron_quantile($hook, $layer, $neuron, 0.5) AS p50,
    neuron_quantile($hook, $layer, $neuron, 0.75) AS p75,
    neuron_quantile($hook, $layer, $neuron, 0.9) AS p90,
    neuron_quantile($hook, $layer, $neuron, 0.99) AS p99,
    neuron_quantile_firing($hook, $layer, $neuron, 0.5) AS firing_p50,
    neuron_quantile_firing($hook, $layer, $neuron, 0.9) AS firing_p90
FROM neurons AS n
WHERE n.hook = $hook AND n.layer = $layer AND n.neuron = $neuron;
