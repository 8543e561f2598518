-- name: heads
-- purpose: attention heads ranked by one score (induction, prev_token, duplicate, bos, entropy), highest first
-- param: order_by = induction
-- param: limit = 20
-- requires: heads
-- Scores (see mining/analyses/heads.py): attention on repeated random tokens [BOS, r, r] to the token
-- after the previous occurrence (induction), to the previous position (prev_token), to the previous
-- occurrence (duplicate); mean attention to position 0 (bos) and attention entropy in nats (entropy).
SELECT
    row_number() OVER (ORDER BY score DESC, layer, head) AS rank,
    *
FROM (
    SELECT
        layer,
        head,
        CASE $order_by
            WHEN 'induction' THEN induction
            WHEN 'prev_token' THEN prev_token
            WHEN 'duplicate' THEN duplicate
            WHEN 'bos' THEN bos
            WHEN 'entropy' THEN entropy
            ELSE error('order_by must be one of induction, prev_token, duplicate, bos, entropy; got ' || $order_by)
        END AS score,
        * EXCLUDE (layer, head)
    FROM heads
)
ORDER BY rank
LIMIT $limit;
