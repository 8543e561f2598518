-- name: pattern-heads
-- purpose: attn.hook_pattern stores: heads ranked by their attention to one key position (key 0: the BOS sink), averaged over every mined token
-- param: context_length
-- param: key = 0
-- param: layer = -1
-- param: limit = 20
-- param: hook = attn.hook_pattern
-- Feature head * context_length + key of a token is its head's attention to that key position (context_length:
-- the job's corpus.context_length). mean is over every mined token, in a causal model those before the key too
-- (their attention to it is 0); max_token_attention is the strongest single token's, frac_active the share of
-- tokens that attend to it at all.
SELECT
    row_number() OVER (ORDER BY mean DESC, layer, head) AS rank,
    *
FROM (
    SELECT
        layer,
        neuron // $context_length AS head,
        mean,
        max AS max_token_attention,
        frac_active
    FROM neurons
    WHERE hook = $hook
        AND ($layer < 0 OR layer = $layer)
        AND neuron % $context_length = $key
)
ORDER BY rank
LIMIT $limit;
