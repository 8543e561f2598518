-- name: bottom-activations
-- purpose: the k lowest activations of one neuron, each with the context around its «token»
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
FROM bottom_examples AS e
LEFT JOIN tokens AS t ON e.tok = t.tok
WHERE e.hook = $hook AND e.layer = $layer AND e.neuron = $neuron AND e.rank <= $k
ORDER BY e.rank;
