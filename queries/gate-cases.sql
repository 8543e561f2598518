-- name: gate-cases
-- purpose: a gated (SwiGLU) neuron's four (gate, up) sign cases: how often, mean value, and the strongest example of each
-- param: layer
-- param: neuron
-- param: hook = mlp.hook_post
-- requires: gate_cases
SELECT
    c.gate_sign,
    c.up_sign,
    c.count,
    c.frac,
    c.mean,
    e.value AS top_value,
    tok_context(e.tok, 10) AS top_context
FROM gate_cases AS c
LEFT JOIN gate_case_examples AS e
    ON e.hook = c.hook AND e.layer = c.layer AND e.neuron = c.neuron
    AND e.gate_sign = c.gate_sign AND e.up_sign = c.up_sign AND e.rank = 1
WHERE c.hook = $hook AND c.layer = $layer AND c.neuron = $neuron
ORDER BY c.gate_sign DESC, c.up_sign DESC;
