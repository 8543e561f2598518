-- name: quantile-bands
-- purpose: one neuron's bands of each kind with their value range and how many examples each holds
-- param: layer
-- param: neuron
-- param: hook = mlp.hook_post
-- requires: quantile_samples
SELECT
    kind,
    band,
    min(band_lo) AS band_lo,
    max(band_hi) AS band_hi,
    count(*) AS examples,
    sum(CASE WHEN exact THEN 1 ELSE 0 END) AS exact_examples,
    min(value) AS min_value,
    max(value) AS max_value
FROM quantile_samples
WHERE hook = $hook AND layer = $layer AND neuron = $neuron
GROUP BY kind, band, band_index
ORDER BY kind, band_index;
