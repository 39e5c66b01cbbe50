"""A run's model configuration (the builder's keywords) completed with the builder's defaults."""

import inspect


def resolve_config(model_config=None):
    """``model_config`` (a dict of :func:`build_maskrcnn` keywords, possibly partial, as in a
    run's config.json) -> the full dict; unknown keys raise naming them."""
    from kerasnuc.models.maskrcnn.model import build_maskrcnn

    defaults = {k: p.default for k, p in inspect.signature(build_maskrcnn).parameters.items()}
    model_config = dict(model_config or {})
    unknown = sorted(set(model_config) - set(defaults))
    if unknown:
        raise ValueError(f"maskrcnn: unknown model_config keys {unknown}; known: {sorted(defaults)}")
    config = {**defaults, **model_config}
    config["input_shape"] = tuple(config["input_shape"])
    return config
