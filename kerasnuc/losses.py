"""Losses from the papers and the field, by name (Keras 3 built-ins where they exist)."""

import keras


@keras.saving.register_keras_serializable(package="kerasnuc")
class BCEDice(keras.losses.Loss):
    """Binary cross-entropy plus soft Dice: BCE for per-pixel calibration, Dice
    against the foreground/background imbalance of sparse nuclei."""

    def __init__(self, dice_weight=1.0, name="bce_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.dice_weight = float(dice_weight)
        self._bce = keras.losses.BinaryCrossentropy()
        self._dice = keras.losses.Dice()

    def call(self, y_true, y_pred):
        return self._bce(y_true, y_pred) + self.dice_weight * self._dice(y_true, y_pred)

    def get_config(self):
        return {**super().get_config(), "dice_weight": self.dice_weight}


def get_loss(name, **options):
    """bce, dice, bce_dice, focal, mse (density maps), categorical (classifiers)."""
    factories = {
        "bce": lambda: keras.losses.BinaryCrossentropy(),
        "dice": lambda: keras.losses.Dice(),
        "bce_dice": lambda: BCEDice(**options),
        "focal": lambda: keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, **options),
        "mse": lambda: keras.losses.MeanSquaredError(),
        "categorical": lambda: keras.losses.SparseCategoricalCrossentropy(),
        "categorical_focal": lambda: keras.losses.CategoricalFocalCrossentropy(**options),
        "bayesnuseg": lambda: _bayesnuseg_loss(**options),
    }
    if name not in factories:
        raise ValueError(f"unknown loss '{name}'; choose from {', '.join(sorted(factories))}")
    return factories[name]()


def _bayesnuseg_loss(**options):
    """BayesNuSeg's seed + embedding loss (:mod:`kerasnuc.losses_embedding`)."""
    from kerasnuc.losses_embedding import BayesNuSegLoss

    return BayesNuSegLoss(**options)
