-- name: invariants
-- purpose: consistency checks across the store's tables; zero rows when the store is healthy
WITH hist AS (
    SELECT hook, layer, neuron, sum(count) AS n FROM histograms GROUP BY ALL
),

ranks AS (
    SELECT 'top_examples' AS tbl, hook, layer, neuron, rank, value, tok FROM top_examples
    UNION ALL
    SELECT 'bottom_examples', hook, layer, neuron, rank, value, tok FROM bottom_examples
    UNION ALL
    SELECT 'top_contexts', hook, layer, neuron, rank, value, tok FROM top_contexts
),

rank_order AS (
    SELECT
        *,
        row_number() OVER (PARTITION BY tbl, hook, layer, neuron ORDER BY rank) AS expect,
        lag(value) OVER (PARTITION BY tbl, hook, layer, neuron ORDER BY rank) AS prev
    FROM ranks
)

SELECT 'histogram counts do not sum to count' AS problem, n.hook, n.layer, n.neuron, n.count::DOUBLE AS detail
FROM neurons AS n
LEFT JOIN hist AS h ON n.hook = h.hook AND n.layer = h.layer AND n.neuron = h.neuron
WHERE h.n IS DISTINCT FROM n.count
UNION ALL
SELECT 'histogram bins out of order or overlapping', hook, layer, neuron, bin
FROM (
    SELECT *, lag(hi) OVER (PARTITION BY hook, layer, neuron ORDER BY bin) AS prev_hi FROM histograms
)
WHERE lo > hi OR prev_hi > lo
UNION ALL
SELECT 'neuron outside its histogram range', n.hook, n.layer, n.neuron, n.min
FROM neurons AS n
INNER JOIN (SELECT hook, layer, neuron, min(lo) AS lo, max(hi) AS hi FROM histograms GROUP BY ALL) AS h
    ON n.hook = h.hook AND n.layer = h.layer AND n.neuron = h.neuron
WHERE n.min < h.lo OR n.max > h.hi
UNION ALL
SELECT 'moments out of range', hook, layer, neuron, mean
FROM neurons
WHERE
    mean < min - 1e-9 * (abs(min) + 1) OR mean > max + 1e-9 * (abs(max) + 1)
    OR std < 0 OR frac_active < 0 OR frac_active > 1
    OR (std = 0 AND min < max)
UNION ALL
SELECT tbl || ' rank gap or duplicate', hook, layer, neuron, rank
FROM rank_order
WHERE rank <> expect
UNION ALL
SELECT tbl || ' values out of rank order', hook, layer, neuron, rank
FROM rank_order
WHERE (tbl = 'bottom_examples' AND value < prev) OR (tbl <> 'bottom_examples' AND value > prev)
UNION ALL
SELECT r.tbl || ' value outside the neuron''s [min, max]', r.hook, r.layer, r.neuron, r.value
FROM ranks AS r
INNER JOIN neurons AS n ON r.hook = n.hook AND r.layer = n.layer AND r.neuron = n.neuron
WHERE r.value > n.max::FLOAT OR r.value < n.min::FLOAT
UNION ALL
SELECT r.tbl || ' tok not in tokens', r.hook, r.layer, r.neuron, r.tok
FROM ranks AS r
ANTI JOIN tokens AS t ON r.tok = t.tok
UNION ALL
SELECT 'top_contexts has two entries from one context', r.hook, r.layer, r.neuron, t.ctx
FROM top_contexts AS r
INNER JOIN tokens AS t ON r.tok = t.tok
GROUP BY r.hook, r.layer, r.neuron, t.ctx
HAVING count(*) > 1
UNION ALL
SELECT 'tokens tok not unique', NULL, NULL, NULL, tok
FROM tokens
GROUP BY tok
HAVING count(*) > 1
UNION ALL
SELECT 'tokens tok not contiguous within a context', NULL, NULL, NULL, ctx
FROM tokens
GROUP BY ctx
HAVING max(tok) - min(tok) <> count(*) - 1 OR count(DISTINCT tok - pos) <> 1
UNION ALL
SELECT 'tokens rows do not match the manifest', NULL, NULL, NULL, m.shard
FROM manifest AS m
LEFT JOIN (SELECT shard, count(*) AS n FROM tokens GROUP BY shard) AS t ON m.shard = t.shard
WHERE coalesce(t.n, 0) <> m.tokens
UNION ALL
SELECT 'tokens doc_id not in docs', NULL, NULL, NULL, t.doc_id
FROM (SELECT DISTINCT doc_id FROM tokens) AS t
ANTI JOIN docs AS d ON t.doc_id = d.doc_id
ORDER BY problem, hook, layer, neuron;
