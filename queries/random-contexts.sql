-- name: random-contexts
-- purpose: n contexts drawn uniformly without replacement, the same for the same seed (random examples for exports)
-- param: n = 10
-- param: seed = 0
SELECT ctx
FROM (SELECT DISTINCT ctx FROM tokens)
ORDER BY hash(ctx, $seed), ctx
LIMIT $n;
