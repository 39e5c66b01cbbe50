"""Progress reporting for long jobs: one line per epoch with time and metrics."""

import time

import keras


class EpochProgress(keras.callbacks.Callback):
    """Prints 'epoch 3/40  12.1s  loss 0.41  val_loss 0.38 ...' after every epoch."""

    def __init__(self, epochs, log=print):
        super().__init__()
        self.epochs, self.log = epochs, log

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        values = "  ".join(f"{k} {v:.4f}" for k, v in sorted((logs or {}).items())
                           if isinstance(v, (int, float)))
        self.log(f"epoch {epoch + 1}/{self.epochs}  {time.time() - self._start:.1f}s  {values}")


class TimeBudget(keras.callbacks.Callback):
    """Stops training at the end of the epoch after which one more epoch (as long as the
    slowest so far) would overrun ``minutes``. Why: CPU-budget runs of GPU recipes keep
    the recipe's epochs and say how many they reached (metrics' ``epochs``).

    The first epoch also pays for compiling the step (XLA under JAX: 95 s of a 100 s first
    epoch for DCRN on a GPU, against 7 s later), so once a second epoch has run, the
    estimate is the slowest epoch after the first."""

    def __init__(self, minutes, log=print):
        super().__init__()
        self.seconds, self.log = float(minutes) * 60.0, log

    def on_train_begin(self, logs=None):
        self._start, self._durations = time.time(), []

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.time()

    def next_epoch_estimate(self):
        """Seconds the next epoch may take: the slowest so far, the first (compiling) one
        counted only while it is the only one."""
        return max(self._durations[1:] or self._durations)

    def on_epoch_end(self, epoch, logs=None):
        now = time.time()
        self._durations.append(now - self._epoch_start)
        if now - self._start + self.next_epoch_estimate() > self.seconds:
            self.model.stop_training = True
            self.log(f"time budget of {self.seconds / 60:.1f} min reached after epoch {epoch + 1}")


def fit_into_run(model, run, train_data, val_data, epochs, log=print, time_budget=0.0):
    """``model.fit`` with the callbacks every task uses: history.csv, the best epoch
    (by val_loss, or loss without validation data) saved as model.keras, and one
    progress line per epoch; ``time_budget`` (minutes, 0: none) stops early. Returns the
    history dict."""
    monitor = "val_loss" if val_data is not None else "loss"
    callbacks = [
        keras.callbacks.CSVLogger(run.file("history.csv")),
        keras.callbacks.ModelCheckpoint(run.file("model.keras"), monitor=monitor, save_best_only=True),
        EpochProgress(epochs, log),
    ]
    if time_budget:
        callbacks.append(TimeBudget(time_budget, log))
    # shuffle=False: the batches are random draws already; Keras' shuffling of their order
    # (Python's random) would make the weights depend on how many passes it makes, and
    # those differ with --distribute.
    history = model.fit(train_data, validation_data=val_data, epochs=epochs, callbacks=callbacks, verbose=0,
                        shuffle=False)
    return history.history
