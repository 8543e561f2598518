-- name: pca-examples
-- purpose: the sampled tokens that project furthest onto one principal component (sign=negative: the other end), with context
-- param: component = 1
-- param: sign = positive
-- param: layer = -1
-- param: hook = mlp.hook_post
-- param: k = 10
-- requires: pca_examples
WITH e AS (
    SELECT layer, rank, score, tok
    FROM pca_examples
    WHERE
        hook = $hook
        AND ($layer < 0 OR layer = $layer)
        AND component = $component
        AND sign = $sign
        AND rank <= $k
)

SELECT
    e.layer,
    e.rank,
    e.score,
    e.tok,
    c.token,
    c.context
FROM e
LEFT JOIN tok_contexts((SELECT list(tok) FROM e), 12) AS c ON c.tok = e.tok
ORDER BY e.layer, e.rank;
