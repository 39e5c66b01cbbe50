"""Self-Correction (Li et al., "Self-Correction for Human Parsing", SCHP) for any segmentation family.

Why: noisy or coarse masks (MoNuSeg's hand-drawn outlines) teach a model their errors; SCHP lets
the model correct its own labels over training cycles. ``training.fit --self-correction CYCLES``:

1. the usual ``epochs`` of training are the warm-up; CYCLES cycles of ``self_correction_epochs``
   epochs follow, the learning rate falling by cosine annealing from ``lr_max * learning_rate``
   towards ``lr_min * learning_rate`` in each and restarting at the next (SCHP's SGDR, per epoch);
2. online model aggregation: at each cycle's end w_avg <- (m w_avg + w) / (m + 1), m the models
   aggregated so far (the warm-up model is the first), and the BatchNorm statistics of w_avg are
   re-estimated on training batches (SCHP's ``bn_re_estimate``);
3. label refinement: then every training target becomes y <- (m y + p) / (m + 1), p the averaged
   model's map of the whole image through the prediction engine, so the next cycle trains on
   soft, refined labels. Validation and test labels never change.

The averaged model is saved as model.keras after each cycle (the warm-up's last model before the
first; no best-epoch pick) and is the one evaluated; history.csv gains the columns ``learning_rate``
and ``cycle`` (0: warm-up), its ``iou`` is against the refined labels thresholded at 0.5
(:class:`RefinedLabelIoU`); ``self_correction.json`` says what each cycle changed.
Not resumable (``--resume`` refuses such a run): the averaged weights and refined labels are not
saved per epoch.
"""

import math
import os
import time

import keras
import numpy as np

from training.callbacks import EpochProgress, TimeBudget
from training.distribute import local_batches


def cycle_learning_rate(epoch_in_cycle, cycle_epochs, lr_max, lr_min):
    """SCHP's cyclical rate at epoch ``k`` (0-based) of a cycle of ``E`` epochs:
    lr_min + (lr_max - lr_min) (1 + cos(pi k / E)) / 2, so lr_max at the first epoch."""
    return lr_min + (lr_max - lr_min) * (1.0 + math.cos(math.pi * epoch_in_cycle / cycle_epochs)) / 2.0


def epoch_schedule(config, epoch):
    """(learning rate or None, cycle) of training epoch ``epoch`` (0-based): warm-up epochs
    keep the optimizer's own rate (None) and are cycle 0; cycle c >= 1 follows
    :func:`cycle_learning_rate`."""
    if epoch < config.epochs:
        return None, 0
    index = epoch - config.epochs
    lr = cycle_learning_rate(index % config.self_correction_epochs, config.self_correction_epochs,
                             config.self_correction_lr_max * config.learning_rate,
                             config.self_correction_lr_min * config.learning_rate)
    return lr, index // config.self_correction_epochs + 1


class CyclicalSchedule(keras.callbacks.Callback):
    """Sets each epoch's learning rate (LearningRateScheduler-style: the optimizer's rate stays a
    plain variable, so model.keras needs no custom schedule) and puts ``learning_rate`` and
    ``cycle`` into the epoch's logs (list it before the CSVLogger). Also starts every dataset
    at the epoch's batches, as training.resume does, so batches depend on the epoch only."""

    def __init__(self, config, datasets=()):
        super().__init__()
        self.config, self.datasets, self.cycle = config, [d for d in datasets if d is not None], 0

    def on_epoch_begin(self, epoch, logs=None):
        lr, self.cycle = epoch_schedule(self.config, epoch)
        if lr is not None:
            self.model.optimizer.learning_rate = lr
        for dataset in self.datasets:
            dataset.set_epoch(epoch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            logs["cycle"] = self.cycle


@keras.saving.register_keras_serializable(package="kerasnuc")  # clone_model copies the compile config
class RefinedLabelIoU(keras.metrics.BinaryIoU):
    """BinaryIoU against labels thresholded at 0.5. Keras' BinaryIoU casts soft labels to
    integers (0.8 -> 0), so on refined labels it reads 0; this counts a pixel as nucleus when
    its refined label says so more likely than not. Only the training model uses it (the saved,
    averaged model keeps the plain metric, so model.keras needs nothing from training/)."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = keras.ops.cast(keras.ops.convert_to_tensor(y_true) >= 0.5, "float32")
        return super().update_state(y_true, y_pred, sample_weight)


def _is_float(variable):
    return "float" in str(variable.dtype)


class WeightAverage:
    """Online model aggregation: ``model`` is a clone holding the running mean of the models
    given so far (``count`` of them). Float variables are averaged (BatchNorm statistics too,
    until :func:`reestimate_batchnorm` replaces them); others (seed states) are copied."""

    def __init__(self, model, compile_model=None):
        self.model = keras.models.clone_model(model)
        self.model.set_weights(model.get_weights())
        if compile_model is not None:
            compile_model(self.model)
            self.model.optimizer.build(self.model.trainable_variables)  # saved complete, reloads quietly
        self.count = 1

    def add(self, model):
        """w_avg <- (m w_avg + w) / (m + 1); returns (L2 distance the trainable weights moved,
        that distance relative to their norm before)."""
        m = self.count
        trainable = {id(v) for v in self.model.trainable_variables}
        moved = norm = 0.0
        for mine, theirs in zip(self.model.weights, model.weights):
            new = keras.ops.convert_to_numpy(theirs)
            if not _is_float(mine):
                mine.assign(new)
                continue
            old = keras.ops.convert_to_numpy(mine).astype(np.float64)
            mean = (m * old + new.astype(np.float64)) / (m + 1)
            if id(mine) in trainable:
                moved += float(np.sum((mean - old) ** 2))
                norm += float(np.sum(old ** 2))
            mine.assign(mean.astype(mine.dtype))
        self.count += 1
        return math.sqrt(moved), math.sqrt(moved) / max(math.sqrt(norm), 1e-12)


def reestimate_batchnorm(model, batches):
    """SCHP's ``bn_re_estimate``: every BatchNormalization's moving mean and variance become the
    plain average of its batch statistics over ``batches`` (inputs x, forward passes in training
    mode), so they fit the averaged weights, which no single model's statistics do. Returns the
    number of batches run (0 and nothing done for a model without BatchNorm)."""
    norms = [layer for layer in model._flatten_layers(include_self=False, recursive=True)
             if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms:
        return 0
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.moving_mean.assign(np.zeros(layer.moving_mean.shape, "float32"))
        layer.moving_variance.assign(np.ones(layer.moving_variance.shape, "float32"))
    count = 0
    try:
        for count, x in enumerate(batches, start=1):
            for layer in norms:  # moving <- moving (n - 1) / n + batch / n: the running mean
                layer.momentum = (count - 1.0) / count
            model(keras.ops.convert_to_tensor(x), training=True)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
    return count


def blend_labels(labels, prediction, m):
    """y <- (m y + p) / (m + 1), float32."""
    return ((m * np.asarray(labels, np.float64) + np.asarray(prediction, np.float64)) / (m + 1)).astype(np.float32)


def refine_labels(dataset, predictions, m):
    """Blend every target of ``dataset`` (a SegmentationDataset: the training one only) with
    its prediction, in place; returns the mean absolute change per pixel and channel."""
    old = dataset.targets
    new = [blend_labels(y, p, m) for y, p in zip(old, predictions)]
    changed = sum(float(np.abs(n - o).sum()) for n, o in zip(new, old))
    dataset.replace_targets(new)
    return changed / max(sum(o.size for o in old), 1)


class SelfCorrection:
    """The warm-up and the cycles of one segmentation run (training.segmentation.train calls
    :meth:`fit` instead of fit_into_run). ``cycles`` holds self_correction.json's per-cycle rows."""

    def __init__(self, config, run, model, train_data, val_data, train_records, multiple, log=print):
        self.config, self.run, self.model, self.log = config, run, model, log
        self.train_data, self.val_data = train_data, val_data
        self.train_records, self.multiple = train_records, multiple
        self.average, self.cycles, self.warmup = None, [], {}
        self.budget = TimeBudget(config.time_budget, log) if config.time_budget else None
        from training.segmentation import compile_model

        compile_model(model, config, RefinedLabelIoU(target_class_ids=[1], name="iou"))  # before training
        channels = model.output_shape[-1]
        if channels != train_data.targets[0].shape[-1]:
            raise SystemExit(f"training.fit: --self-correction: model {config.model} gives {channels} output "
                             f"channels, its training targets {train_data.targets[0].shape[-1]}; cannot refine them")

    @property
    def total_epochs(self):
        return self.config.epochs + self.config.self_correction * self.config.self_correction_epochs

    def _fit(self, first, last):
        """Epochs ``first``..``last - 1`` (global numbering); True when the time budget stopped them."""
        callbacks = [CyclicalSchedule(self.config, (self.train_data, self.val_data)),
                     keras.callbacks.CSVLogger(self.run.file("history.csv"), append=first > 0)]
        callbacks += [EpochProgress(self.total_epochs, self.log)] + ([self.budget] if self.budget else [])
        if self.budget is not None and first > 0:  # the warm-up, earlier cycles and their averaging count
            self.budget.restore(self.budget.durations, elapsed=time.time() - self._began)
        self.model.fit(local_batches(self.train_data), validation_data=local_batches(self.val_data),
                       epochs=last, initial_epoch=first, callbacks=callbacks, verbose=0, shuffle=False)
        return bool(self.model.stop_training)

    def _val_loss(self, model):
        """Loss of ``model`` on the validation crops of epoch 0 (the same crops every cycle)."""
        if self.val_data is None:
            return None
        self.val_data.set_epoch(0)
        return float(model.evaluate(local_batches(self.val_data), verbose=0, return_dict=True)["loss"])

    def _bn_batches(self):
        count = self.config.self_correction_bn_batches or len(self.train_data)
        return (self.train_data[i % len(self.train_data)][0] for i in range(count))

    def fit(self):
        """Warm-up, then the cycles; returns the history of every epoch (training.resume.read_history)."""
        from training.resume import read_history
        from training.segmentation import compile_model, predict_maps

        config, E = self.config, self.config.self_correction_epochs
        self._began = time.time()
        stopped = self._fit(0, config.epochs)
        self.average = WeightAverage(self.model, lambda model: compile_model(model, config))
        self._save()  # the warm-up's last model, the first of the average
        self.warmup = {"epochs": config.epochs, "val_loss_averaged": self._val_loss(self.average.model)}
        for cycle in range(1, config.self_correction + 1):
            if stopped:
                break
            first = config.epochs + (cycle - 1) * E
            started = time.time()
            stopped = self._fit(first, first + E)
            trained = time.time()
            m = self.average.count
            moved, relative = self.average.add(self.model)
            bn = reestimate_batchnorm(self.average.model, self._bn_batches())
            averaged = time.time()
            predictions = predict_maps(self.average.model, self.train_records, config, self.multiple)
            change = refine_labels(self.train_data, predictions, m)
            seconds = {"training": round(trained - started, 1), "averaging": round(averaged - trained, 1),
                       "label_refinement": round(time.time() - averaged, 1)}
            history = read_history(self.run.file("history.csv"))
            rates = [lr for lr, c in zip(history["learning_rate"], history["cycle"]) if c == cycle]
            self.cycles.append({
                "cycle": cycle, "epochs": [first + 1, first + len(rates)],
                "learning_rate": [max(rates), min(rates)] if rates else None,
                "models_averaged": self.average.count, "weights_moved": moved,
                "weights_moved_relative": relative, "batchnorm_batches": bn,
                "label_change": change, "val_loss_model": history.get("val_loss", [None])[-1],
                "val_loss_averaged": self._val_loss(self.average.model), "seconds": seconds})
            self._save()
            self.log(f"self-correction cycle {cycle}/{config.self_correction}: {self.average.count} models "
                     f"averaged (weights moved {relative:.2e} relative), labels changed {change:.4f} per pixel, "
                     f"averaged val_loss {self.cycles[-1]['val_loss_averaged']}")
        if stopped and len(self.cycles) < config.self_correction:
            self.log(f"self-correction: time budget reached after {len(self.cycles)} of "
                     f"{config.self_correction} cycles")
        self._write_record(stopped)
        return read_history(self.run.file("history.csv"))

    def _save(self):
        """The averaged model replaces model.keras, through a temporary file (as BestModel)."""
        path = self.run.file("model.keras")
        tmp = f"{path[:-len('.keras')]}.tmp{os.getpid()}.keras"
        self.average.model.save(tmp)
        os.replace(tmp, path)

    def _write_record(self, stopped):
        config = self.config
        self.run.write_json("self_correction.json", {
            "method": "Self-Correction (Li et al., SCHP): cyclical learning rate, online model "
                      "aggregation with BatchNorm re-estimation, label refinement y <- (m y + p) / (m + 1)",
            "cycles_requested": config.self_correction, "cycles": len(self.cycles),
            "cycle_epochs": config.self_correction_epochs,
            "learning_rate_range": [config.self_correction_lr_max * config.learning_rate,
                                    config.self_correction_lr_min * config.learning_rate],
            "model_saved": "averaged" if self.cycles else "last warm-up epoch",
            "stopped_by_time_budget": bool(stopped and len(self.cycles) < config.self_correction),
            "warmup": self.warmup, "per_cycle": self.cycles})
