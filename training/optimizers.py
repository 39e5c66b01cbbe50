"""Optimizers by name, as the papers' recipes give them."""

import keras


def make_optimizer(config):
    """adam, adamw or sgd (``config.momentum``, Nesterov off), with ``weight_decay`` where set."""
    lr, decay = config.learning_rate, config.weight_decay or None
    if config.optimizer == "adam":
        return keras.optimizers.Adam(lr, weight_decay=decay)
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=decay or 1e-4)
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=config.momentum, weight_decay=decay)
    raise ValueError(f"unknown optimizer '{config.optimizer}'; choose adam, adamw or sgd")
