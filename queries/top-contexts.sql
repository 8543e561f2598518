-- name: top-contexts
-- purpose: the k contexts where one neuron peaks highest (one row per context, at its peak «token»)
-- param: layer
-- param: neuron
-- param: hook = mlp.hook_post
-- param: k = 10
WITH e AS (
    SELECT rank, value, tok
    FROM top_contexts
    WHERE hook = $hook AND layer = $layer AND neuron = $neuron AND rank <= $k
)

SELECT
    e.rank,
    e.value,
    e.tok,
    c.doc_id,
    c.pos,
    c.token,
    c.context
FROM e
LEFT JOIN tok_contexts((SELECT list(tok) FROM e), 12) AS c ON c.tok = e.tok
ORDER BY e.rank;
