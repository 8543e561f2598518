-- name: gate-cases
-- purpose: a gated (SwiGLU) neuron's four (gate, up) sign cases: how often, mean value, and the strongest example of each
-- param: layer
-- param: neuron
-- param: hook = mlp.hook_post
-- requires: gate_cases
WITH cases AS (
    SELECT
        c.gate_sign,
        c.up_sign,
        c.count,
        c.frac,
        c.mean,
        e.value AS top_value,
        e.tok
    FROM gate_cases AS c
    LEFT JOIN gate_case_examples AS e
        ON e.hook = c.hook AND e.layer = c.layer AND e.neuron = c.neuron
        AND e.gate_sign = c.gate_sign AND e.up_sign = c.up_sign AND e.rank = 1
    WHERE c.hook = $hook AND c.layer = $layer AND c.neuron = $neuron
)

SELECT
    cases.gate_sign,
    cases.up_sign,
    cases.count,
    cases.frac,
    cases.mean,
    cases.top_value,
    x.context AS top_context
FROM cases
LEFT JOIN tok_contexts((SELECT list(tok) FROM cases WHERE tok IS NOT NULL), 10) AS x ON x.tok = cases.tok
ORDER BY cases.gate_sign DESC, cases.up_sign DESC;
