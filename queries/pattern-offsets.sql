-- name: pattern-offsets
-- purpose: heads ranked by their mean attention to the token `distance` positions back (1: previous-token heads), from `mine analyze STORE offsets`
-- param: distance = 1
-- param: layer = -1
-- param: limit = 20
-- requires: pattern_offsets
-- Over the dense sample of attn.hook_pattern: mean is a head's attention from a token to the token `distance`
-- positions before it, averaged over the sampled tokens that have one (n); distance 0 is the token itself.
SELECT
    row_number() OVER (ORDER BY mean DESC, layer, head) AS rank,
    layer,
    head,
    mean,
    n
FROM pattern_offsets
WHERE distance = $distance AND ($layer < 0 OR layer = $layer)
ORDER BY rank
LIMIT $limit;
