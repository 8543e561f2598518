-- name: quantiles
-- purpose: one neuron's quantiles from its histogram, overall and among firing tokens, with q * max
-- param: layer
-- param: neuron
-- param: hook = mlp.hook_post
WITH qs AS (
    SELECT unnest([0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0]::DOUBLE[]) AS q
)

SELECT
    qs.q,
    nq.value,
    nq.value_firing,
    qs.q * n.max AS frac_of_max
FROM qs
INNER JOIN neurons AS n ON n.hook = $hook AND n.layer = $layer AND n.neuron = $neuron
INNER JOIN LATERAL (
    SELECT value, value_firing FROM neuron_quantiles($hook, $layer, qs.q) WHERE neuron = $neuron
) AS nq ON true
ORDER BY qs.q;
