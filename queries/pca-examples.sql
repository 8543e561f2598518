-- name: pca-examples
-- purpose: the sampled tokens that project furthest onto one principal component (sign=negative: the other end), with context
-- param: component = 1
-- param: sign = positive
-- param: layer = -1
-- param: hook = mlp.hook_post
-- param: k = 10
-- requires: pca_examples
SELECT
    e.layer,
    e.rank,
    e.score,
    e.tok,
    t.token,
    tok_context(e.tok, 12) AS context
FROM pca_examples AS e
LEFT JOIN tokens AS t ON e.tok = t.tok
WHERE
    e.hook = $hook
    AND ($layer < 0 OR e.layer = $layer)
    AND e.component = $component
    AND e.sign = $sign
    AND e.rank <= $k
ORDER BY e.layer, e.rank;
