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


@keras.saving.register_keras_serializable(package="kerasnuc")
class CCEDice(keras.losses.Loss):
    """Categorical cross-entropy plus soft Dice of the nucleus channels, for a background /
    inside / boundary softmax: the thin boundary channel is rare, and Dice keeps it from being
    learned away as background (which would merge touching nuclei again)."""

    def __init__(self, dice_weight=1.0, name="cce_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.dice_weight = float(dice_weight)
        self._cce = keras.losses.CategoricalCrossentropy()

    def call(self, y_true, y_pred):
        y_true = keras.ops.cast(y_true, y_pred.dtype)
        cce = self._cce(y_true, y_pred)
        axes = tuple(range(1, len(y_pred.shape) - 1))  # per image and channel
        inter = keras.ops.sum(y_true * y_pred, axis=axes)
        total = keras.ops.sum(y_true + y_pred, axis=axes)
        dice = 1.0 - (2.0 * inter + 1.0) / (total + 1.0)
        return cce + self.dice_weight * keras.ops.mean(dice[:, 1:], axis=-1)

    def get_config(self):
        return {**super().get_config(), "dice_weight": self.dice_weight}


def get_loss(name, **options):
    """bce, dice, bce_dice, cce_dice (three-class softmax), focal, mse (density maps), categorical
    (classifiers)."""
    factories = {
        "bce": lambda: keras.losses.BinaryCrossentropy(),
        "dice": lambda: keras.losses.Dice(),
        "bce_dice": lambda: BCEDice(**options),
        "cce_dice": lambda: CCEDice(**options),
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
