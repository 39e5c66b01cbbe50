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
