"""What a model multiplies its logits and its blocks' outputs by, read from its Hugging Face config alone (never from
mining), for the tests that check DLA, the logit lens and the hooks against the models' own outputs."""


def logit_factor(config) -> float:
    """Cohere's logit_scale, Granite's 1 / logits_scaling; 1 elsewhere."""
    return getattr(config, "logit_scale", None) or 1.0 / getattr(config, "logits_scaling", 1.0)


def residual_factor(config) -> float:
    """Granite's residual_multiplier on what each block adds to the stream; 1 elsewhere."""
    return getattr(config, "residual_multiplier", 1.0)
