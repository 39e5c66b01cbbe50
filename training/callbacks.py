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


def fit_into_run(model, run, train_data, val_data, epochs, log=print):
    """``model.fit`` with the callbacks every task uses: history.csv, the best epoch
    (by val_loss, or loss without validation data) saved as model.keras, and one
    progress line per epoch. Returns the history dict."""
    monitor = "val_loss" if val_data is not None else "loss"
    callbacks = [
        keras.callbacks.CSVLogger(run.file("history.csv")),
        keras.callbacks.ModelCheckpoint(run.file("model.keras"), monitor=monitor, save_best_only=True),
        EpochProgress(epochs, log),
    ]
    history = model.fit(train_data, validation_data=val_data, epochs=epochs, callbacks=callbacks, verbose=0)
    return history.history
