-- name: neuron-examples
-- purpose: one neuron's example tokens for exports and the viewer: its top contexts and bottom tokens, with context and character span
-- param: layer
-- param: neuron
-- param: hook = mlp.hook_post
-- param: k = 10
-- requires: top_contexts, bottom_examples
-- set: top (one row per context, at its peak token) or bottom (the most negative tokens).
-- The context's tokens and the activation on each are recomputed by `mine export` (replay).
WITH picked AS (
    SELECT 'top' AS set, rank, value, tok
    FROM top_contexts
    WHERE hook = $hook AND layer = $layer AND neuron = $neuron AND rank <= $k
    UNION ALL
    SELECT 'bottom' AS set, rank, value, tok
    FROM bottom_examples
    WHERE hook = $hook AND layer = $layer AND neuron = $neuron AND rank <= $k
)

SELECT
    p.set,
    p.rank,
    p.value,
    p.tok,
    t.ctx,
    t.doc_id,
    t.char_start,
    t.char_end,
    t.token
FROM picked AS p
INNER JOIN tokens AS t ON t.tok = p.tok
ORDER BY p.set = 'bottom', p.rank;
