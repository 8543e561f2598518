-- name: polysemanticity
-- purpose: neurons ranked by how many different tokens their top contexts peak on (token entropy, distinct tokens, purity)
-- param: hook = mlp.hook_post
-- param: layer = -1
-- param: order = most
-- param: limit = 20
-- Over top_contexts (one peak per context): entropy_bits of the peak token's text, distinct
-- tokens, and purity = share of the single most common peak token. Low entropy / high purity:
-- a token detector (monosemantic at the token level); high entropy: many unrelated triggers,
-- or a feature above the token level. Read together with kurtosis and frac_active.
WITH peaks AS (
    SELECT e.hook, e.layer, e.neuron, t.token
    FROM top_contexts AS e
    INNER JOIN tokens AS t ON t.tok = e.tok
    WHERE e.hook = $hook AND ($layer < 0 OR e.layer = $layer)
),

per_token AS (
    SELECT hook, layer, neuron, token, count(*) AS n
    FROM peaks
    GROUP BY ALL
),

per_neuron AS (
    SELECT
        hook,
        layer,
        neuron,
        sum(n) AS examples,
        count(*) AS distinct_tokens,
        max(n) / sum(n) AS purity,
        0 - sum((n / total) * log2(n / total)) AS entropy_bits
    FROM (SELECT *, sum(n) OVER (PARTITION BY hook, layer, neuron) AS total FROM per_token)
    GROUP BY ALL
)

SELECT
    p.hook,
    p.layer,
    p.neuron,
    p.entropy_bits,
    p.distinct_tokens,
    p.purity,
    p.examples,
    n.kurtosis,
    n.frac_active,
    n.max
FROM per_neuron AS p
INNER JOIN neurons AS n ON n.hook = p.hook AND n.layer = p.layer AND n.neuron = p.neuron
ORDER BY CASE WHEN $order = 'least' THEN p.entropy_bits ELSE -p.entropy_bits END, p.layer, p.neuron
LIMIT $limit;
