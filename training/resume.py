"""Training state saved after every epoch, so ``training.fit --resume RUN`` continues a run
that crashed (or was killed) from its last completed epoch as if it had never stopped.

``<run>/resume/`` holds ``epoch-NNNN.weights.h5`` (model and optimizer variables, so the
learning rate, its schedule and Adam's moments come back) and ``state.json`` naming it,
with what the weights file cannot hold: the epoch, the random state of every Keras seed
generator (dropout), the datasets' epoch counters (their batches are a pure function of
seed, epoch and index), the best monitored value so far and the epoch durations the
time budget counts. ``state.json`` is written (atomically) only after its weights file is
complete, and the previous weights file is deleted only after that, so a ``kill -9`` at
any moment leaves one consistent state.
"""

import glob
import os

import keras

from kerasnuc.atomic import atomic_path, write_text_atomic
from kerasnuc.runs import read_json, write_json_atomic

STATE_DIR = "resume"


def _seed_generators(model):
    """Every SeedGenerator the model's layers draw from, in a stable order, plus the global one."""
    from keras.src.random.seed_generator import global_seed_generator

    found = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        found.extend(getattr(layer, "_seed_generators", []) or [])
    found.append(global_seed_generator())
    return found


class ResumableState(keras.callbacks.Callback):
    """Writes the state after each epoch and restores it (if there is one) before training.

    ``datasets``: the PyDatasets whose ``epoch`` counter decides their batches; each
    epoch starts by setting it to the training epoch, so batches do not depend on how
    often Keras itself resets the iterators. ``checkpoint``: the ModelCheckpoint whose
    ``best`` must survive a restart, or the best epoch would be chosen again from scratch.
    """

    def __init__(self, run_path, datasets=(), checkpoint=None, budget=None):
        super().__init__()
        self.folder = os.path.join(run_path, STATE_DIR)
        self.datasets, self.checkpoint, self.budget = [d for d in datasets if d is not None], checkpoint, budget
        self.state = read_json(os.path.join(self.folder, "state.json"), default=None)

    @property
    def epochs_done(self):
        return int(self.state["epoch"]) if self.state else 0

    @property
    def stopped(self):
        """True when the time budget had already ended training before the restart."""
        return bool(self.state and self.state.get("stopped"))

    def on_train_begin(self, logs=None):
        if not self.state:
            return
        model = self.model
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(os.path.join(self.folder, self.state["weights"]))
        for generator, value in zip(_seed_generators(model), self.state["seeds"]):
            generator.state.assign(keras.ops.convert_to_tensor(value, dtype=generator.state.dtype))
        if self.checkpoint is not None and self.state.get("best") is not None:
            self.checkpoint.best = float(self.state["best"])
        if self.budget is not None:
            self.budget.restore(self.state.get("durations", []))

    def on_epoch_begin(self, epoch, logs=None):
        for dataset in self.datasets:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(self.folder, exist_ok=True)
        name = f"epoch-{epoch + 1:04d}.weights.h5"
        with atomic_path(os.path.join(self.folder, name)) as tmp:
            self.model.save_weights(tmp)
        best = getattr(self.checkpoint, "best", None)
        state = {"epoch": epoch + 1, "weights": name,
                 "seeds": [keras.ops.convert_to_numpy(g.state).tolist() for g in _seed_generators(self.model)],
                 "best": None if best is None else float(best),
                 "durations": list(self.budget.durations) if self.budget is not None else [],
                 "stopped": bool(self.model.stop_training)}
        write_json_atomic(os.path.join(self.folder, "state.json"), state)
        self.state = state
        for old in glob.glob(os.path.join(self.folder, "*.weights.h5")):
            if os.path.basename(old) != name:
                os.remove(old)


def truncate_history(path, epochs):
    """Keep the header and the first ``epochs`` rows of history.csv: rows of an epoch whose
    state was never saved (killed between the two writes) are trained again."""
    if not os.path.exists(path):
        return
    with open(path) as handle:
        lines = handle.readlines()
    kept = lines[: 1 + epochs] if lines else []
    write_text_atomic(path, kept)


def read_history(path):
    """history.csv as {column: [values]} (what ``model.fit`` returns, for every epoch so far)."""
    import csv

    if not os.path.exists(path):
        return {}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = [c for c in (rows[0].keys() if rows else []) if c != "epoch"]
    return {c: [float(row[c]) for row in rows] for c in columns}
