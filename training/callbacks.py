"""Progress reporting for long jobs: one line per epoch with time and metrics."""

import os
import time

import keras

from training.distribute import local_batches


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
        self._spent, self._spent_seconds = [], 0.0

    def on_train_begin(self, logs=None):
        self._start, self.durations = time.time() - self._spent_seconds, list(self._spent)

    def restore(self, durations, elapsed=None):
        """Continue a budget: the epochs already trained (a resumed run's, or an earlier
        ``fit`` call's, as Self-Correction's phases are) count as spent, and so do ``elapsed``
        seconds in all when given (default: the epochs' own time)."""
        self._spent = list(durations)
        self._spent_seconds = sum(self._spent) if elapsed is None else float(elapsed)
        self.durations = list(durations)
        self._start = time.time() - self._spent_seconds

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.time()

    def next_epoch_estimate(self):
        """Seconds the next epoch may take: the slowest so far, the first (compiling) one
        counted only while it is the only one."""
        return max(self.durations[1:] or self.durations)

    def on_epoch_end(self, epoch, logs=None):
        now = time.time()
        self.durations.append(now - self._epoch_start)
        if now - self._start + self.next_epoch_estimate() > self.seconds:
            self.model.stop_training = True
            self.log(f"time budget of {self.seconds / 60:.1f} min reached after epoch {epoch + 1}")


class BestModel(keras.callbacks.Callback):
    """Saves the model as ``path`` whenever ``monitor`` improves, through a temporary file
    so a kill during the write never leaves a broken model.keras (Keras' ModelCheckpoint
    writes in place). ``save``: the model to write instead of the one being fitted (an
    instance family fits a trainer around its inference model, which is what a run keeps)."""

    def __init__(self, path, monitor="val_loss", save=None):
        super().__init__()
        self.path, self.monitor, self.best, self.save = path, monitor, float("inf"), save

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not value < self.best:
            return
        self.best = float(value)
        tmp = f"{self.path[:-len('.keras')]}.tmp{os.getpid()}.keras"
        (self.save or self.model).save(tmp)
        os.replace(tmp, self.path)


def fit_into_run(model, run, train_data, val_data, epochs, log=print, time_budget=0.0, save=None,
                 extra_callbacks=(), init_weights=""):
    """``model.fit`` with the callbacks every task uses: history.csv, the best epoch
    (by val_loss, or loss without validation data) saved as model.keras, one progress
    line per epoch, and the state ``--resume`` continues from (training/resume.py);
    ``time_budget`` (minutes, 0: none) stops early. A run folder that already holds a
    saved state continues from its last completed epoch. Returns the history dict of
    every epoch (resumed ones included). ``save``: the model written as model.keras when it
    is not ``model`` itself (:class:`BestModel`). ``extra_callbacks`` run after these (the
    training benchmark times the steps of this very call: bench/bench_training.py).
    ``init_weights``: a trained model whose weights a new run starts from (training/warm_start.py)."""
    from training.resume import ResumableState, read_history, truncate_history

    monitor = "val_loss" if val_data is not None else "loss"
    checkpoint = BestModel(run.file("model.keras"), monitor, save)
    budget = TimeBudget(time_budget, log) if time_budget else None
    state = ResumableState(run.path, (train_data, val_data), checkpoint, budget)
    done = state.epochs_done
    truncate_history(run.file("history.csv"), done)
    if init_weights and not done:
        from training.warm_start import load_initial_weights

        load_initial_weights(save or model, init_weights, log)
    if done:
        log(f"resuming after epoch {done}/{epochs}" + (" (time budget already reached)" if state.stopped else ""))
    callbacks = [keras.callbacks.CSVLogger(run.file("history.csv"), append=bool(done)), checkpoint,
                 EpochProgress(epochs, log)] + ([budget] if budget else []) + [state] + list(extra_callbacks)
    if not (state.stopped or done >= epochs):
        # shuffle=False: the batches are random draws already; Keras' shuffling of their order
        # (Python's random) would make the weights depend on how many passes it makes, and
        # those differ with --distribute.
        model.fit(local_batches(train_data), validation_data=local_batches(val_data), epochs=epochs,
                  initial_epoch=done, callbacks=callbacks, verbose=0, shuffle=False)
    return read_history(run.file("history.csv"))
