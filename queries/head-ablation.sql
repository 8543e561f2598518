-- name: head-ablation
-- purpose: heads ranked by how much the corpus loss rises when each is ablated (zero or mean)
-- param: kind = mean
-- param: limit = 20
-- requires: head_ablation
-- loss_delta = mean next-token loss (nats) over the ablation contexts with the head's output
-- replaced by zeros ('zero') or by its mean over those contexts ('mean') minus the clean loss.
-- Mean ablation removes the head's information but keeps its average contribution, so it is the
-- fairer measure of what a head computes; zero ablation also removes a constant offset.
SELECT layer, head, kind, loss_delta, rank() OVER (ORDER BY loss_delta DESC) AS rank
FROM head_ablation
WHERE kind = $kind
ORDER BY loss_delta DESC, layer, head
LIMIT $limit;
