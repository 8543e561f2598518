-- name: top-contexts
-- purpose: the k contexts where one neuron peaks highest (one row per context, at its peak «token»)
-- param: layer
-- param: neuron
-- param: hook = mlp.hook_post
-- param: k = 10
SELECT
    e.rank,
    e.value,
    e.tok,
    t.doc_id,
    t.pos,
    t.token,
    tok_context(e.tok, 12) AS context
FROM top_contexts AS e
LEFT JOIN tokens AS t ON e.tok = t.tok
WHERE e.hook = $hook AND e.layer = $layer AND e.neuron = $neuron AND e.rank <= $k
ORDER BY e.rank;
