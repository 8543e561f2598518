"""Pure, mergeable per-neuron statistics over activations (no models, no Ray).

Every reducer keeps its state on the device of the data it is fed; `update` mutates it,
`merge` returns a new reducer and leaves both inputs alone, and results do not depend on how
the data was sharded or in which order shards are merged (bit for bit for top-k and counts).
`state_dict()` gives CPU tensors (config included) that `from_state_dict` rebuilds exactly.
"""

from .histogram import Histogram, HistogramBins, fraction_of_max, quantile_error_bound, quantile_from_counts
from .moments import Moments
from .samples import QuantileSamples
from .topk import ContextTopK, TopK

__all__ = [
    "QuantileSamples",
    "TopK", "ContextTopK", "HistogramBins", "Histogram", "Moments",
    "quantile_from_counts", "quantile_error_bound", "fraction_of_max",
]
