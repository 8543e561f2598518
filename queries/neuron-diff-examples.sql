-- name: neuron-diff-examples
-- purpose: diff stores: one neuron's tokens where B's activation most exceeds A's (or A's B's), or each model's top-k
-- param: layer
-- param: neuron
-- param: hook = mlp.hook_post
-- param: set = b_above_a
-- param: k = 10
-- requires: neuron_diff_examples, diff_top_examples
-- set = b_above_a | a_above_b (value = activation of B - A at the token) | top_a | top_b (value = that
-- model's activation: its top-k, to compare what each model's neuron fires on).
WITH valid AS (
    SELECT CASE WHEN $set IN ('b_above_a', 'a_above_b', 'top_a', 'top_b') THEN true
        ELSE error('set must be b_above_a, a_above_b, top_a or top_b, got ' || $set) END AS ok
),

checked AS (
    SELECT rank, diff AS value, tok
    FROM neuron_diff_examples CROSS JOIN valid
    WHERE ok AND hook = $hook AND layer = $layer AND neuron = $neuron AND sign = $set AND rank <= $k
    UNION ALL
    SELECT rank, value, tok
    FROM diff_top_examples CROSS JOIN valid
    WHERE ok AND hook = $hook AND layer = $layer AND neuron = $neuron AND 'top_' || model = $set AND rank <= $k
)

SELECT
    checked.rank,
    checked.value,
    checked.tok,
    c.doc_id,
    c.pos,
    c.token,
    c.context
FROM checked
LEFT JOIN tok_contexts((SELECT list(tok) FROM checked), 12) AS c ON c.tok = checked.tok
ORDER BY checked.rank;
