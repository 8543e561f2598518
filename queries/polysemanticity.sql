-- name: polysemanticity
-- purpose: neurons ranked by polysemanticity: embedding coherence of their peaks, token entropy, variance explained by token/position
-- param: hook = mlp.hook_post
-- param: layer = -1
-- param: by = coherence
-- param: order = most
-- param: limit = 20
-- requires: top_contexts, neurons, tokens, neuron_variance, neuron_coherence
-- Per neuron, over top_contexts (one peak per context): entropy_bits of the peak token's text,
-- distinct tokens and purity (share of the most common peak token); coherence = mean pairwise
-- cosine of the peak tokens' centered input embeddings (1: one token, high: one concept over many
-- tokens, ~0: unrelated triggers); var_token / var_position = share of the activation's variance
-- explained by the current token / the position (bias-corrected, over the whole corpus), with
-- kurtosis and frac_active from neurons. `by` = coherence | entropy | var_token; order = most
-- ranks the most polysemantic first (least coherent, highest entropy, least token-explained).
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
),

ranked AS (
    SELECT
        p.hook,
        p.layer,
        p.neuron,
        c.coherence,
        p.entropy_bits,
        p.distinct_tokens,
        p.purity,
        v.var_token,
        v.var_position,
        n.kurtosis,
        n.frac_active,
        n.max,
        p.examples,
        CASE $by
            WHEN 'coherence' THEN -c.coherence
            WHEN 'entropy' THEN p.entropy_bits
            WHEN 'var_token' THEN -v.var_token
            ELSE error('by must be coherence, entropy or var_token')
        END AS score
    FROM per_neuron AS p
    INNER JOIN neurons AS n ON n.hook = p.hook AND n.layer = p.layer AND n.neuron = p.neuron
    LEFT JOIN neuron_coherence AS c ON c.hook = p.hook AND c.layer = p.layer AND c.neuron = p.neuron
    LEFT JOIN neuron_variance AS v ON v.hook = p.hook AND v.layer = p.layer AND v.neuron = p.neuron
)

SELECT * EXCLUDE (score)
FROM ranked
ORDER BY CASE WHEN $order = 'least' THEN score ELSE -score END NULLS LAST, layer, neuron
LIMIT $limit;
