"""The time budget that lets CPU-budget runs keep a GPU recipe's epoch count."""

import time

import keras
import numpy as np

from training.callbacks import TimeBudget


class _SlowEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        time.sleep(0.3)


def _fit(budget_minutes, epochs=6):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 1), "float32")
    messages = []
    # the slow callback runs first, so the budget sees epochs of at least 0.3 s
    callbacks = [_SlowEpoch()] + ([TimeBudget(budget_minutes, messages.append)] if budget_minutes else [])
    history = model.fit(x, y, epochs=epochs, verbose=0, callbacks=callbacks)
    return len(history.history["loss"]), messages


def test_budget_stops_before_an_epoch_would_overrun_it():
    # 1.0 s budget, >= 0.3 s epochs: after epoch 2 (>= 0.6 s) a third would reach >= 0.9 s,
    # after epoch 3 a fourth would overrun, so training must stop at epoch 3 at the latest.
    ran, messages = _fit(1.0 / 60)
    assert 1 <= ran <= 3
    assert messages and f"after epoch {ran}" in messages[0]


def test_without_budget_all_epochs_run():
    ran, _ = _fit(0)
    assert ran == 6


def test_slow_first_epoch_does_not_end_the_budget_early():
    # a 3 s first epoch (compiling) then 0.05 s epochs, 4 s budget: judged by the first
    # epoch, training would stop after it (3 + 3 > 4); the estimate must use later epochs.
    budget = TimeBudget(4.0 / 60, lambda message: None)
    budget.on_train_begin()
    budget._start -= 3.0
    budget.durations = [3.0]
    assert budget.next_epoch_estimate() == 3.0
    budget.durations = [3.0, 0.05, 0.08]
    assert budget.next_epoch_estimate() == 0.08
