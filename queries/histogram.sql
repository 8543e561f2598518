-- name: histogram
-- purpose: one neuron's non-empty histogram bins in value order, with each bin's share of its tokens
-- param: layer
-- param: neuron
-- param: hook = mlp.hook_post
SELECT
    bin,
    lo,
    hi,
    count,
    count / sum(count) OVER () AS share
FROM histograms
WHERE hook = $hook AND layer = $layer AND neuron = $neuron
ORDER BY bin;
