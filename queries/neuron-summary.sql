-- name: neuron-summary
-- purpose: one neuron's moments, activity and quantiles (p01..p99; firing-only median and p90)
-- param: layer
-- param: neuron
-- param: hook = mlp.hook_post
-- Quantiles from the neuron's histogram bins, read once (the rule of the neuron_quantiles macro:
-- rank r = greatest(1, ceil(q * count)), the first bin whose cumulative count reaches r, its
-- midpoint clamped to [min, max]; the exact-zero bin gives 0; firing = bins above zero only).
WITH n AS (
    SELECT * FROM neurons WHERE hook = $hook AND layer = $layer AND neuron = $neuron
),

bins AS (
    SELECT
        h.bin,
        CASE WHEN h.lo = 0 AND h.hi = 0 THEN 0.0 ELSE (greatest(h.lo, n.min) + least(h.hi, n.max)) / 2 END AS est,
        h.lo >= 0 AND NOT (h.lo = 0 AND h.hi = 0) AS firing,
        sum(h.count) OVER (ORDER BY h.bin) AS cum,
        sum(CASE WHEN firing THEN h.count ELSE 0 END) OVER (ORDER BY h.bin) AS cum_firing,
        sum(CASE WHEN firing THEN h.count ELSE 0 END) OVER () AS n_firing
    FROM histograms AS h, n
    WHERE h.hook = $hook AND h.layer = $layer AND h.neuron = $neuron
),

picked AS (
    SELECT
        arg_min(b.est, b.bin) FILTER (WHERE b.cum >= greatest(1, ceil(0.01 * n.count))) AS p01,
        arg_min(b.est, b.bin) FILTER (WHERE b.cum >= greatest(1, ceil(0.1 * n.count))) AS p10,
        arg_min(b.est, b.bin) FILTER (WHERE b.cum >= greatest(1, ceil(0.25 * n.count))) AS p25,
        arg_min(b.est, b.bin) FILTER (WHERE b.cum >= greatest(1, ceil(0.5 * n.count))) AS p50,
        arg_min(b.est, b.bin) FILTER (WHERE b.cum >= greatest(1, ceil(0.75 * n.count))) AS p75,
        arg_min(b.est, b.bin) FILTER (WHERE b.cum >= greatest(1, ceil(0.9 * n.count))) AS p90,
        arg_min(b.est, b.bin) FILTER (WHERE b.cum >= greatest(1, ceil(0.99 * n.count))) AS p99,
        arg_min(b.est, b.bin) FILTER (
            WHERE b.firing AND b.cum_firing >= greatest(1, ceil(0.5 * b.n_firing))
        ) AS firing_p50,
        arg_min(b.est, b.bin) FILTER (
            WHERE b.firing AND b.cum_firing >= greatest(1, ceil(0.9 * b.n_firing))
        ) AS firing_p90
    FROM bins AS b, n
)

SELECT n.*, picked.*
FROM n, picked;
