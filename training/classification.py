"""The classification task (DCRN / DenseNet): classify ``config.patch`` x ``config.patch``
patches centred on annotated nuclei (CRCHistoPhenotypes: epithelial, inflammatory,
fibroblast, others).

The split is by image, as ``split`` gives it: every patch of an image is on the same side
(patches of one image overlap and share its staining, so a patch-level split would leak).
Training draws nuclei at random with augmentation; validation and test use every nucleus
exactly once, unaugmented (``ClassificationDataset(evaluation=True)``).
"""

import time

import keras
import numpy as np

from kerasnuc import models
from kerasnuc.data.augment import Augmenter
from kerasnuc.data.splits import records_of
from kerasnuc.data.pipeline import ClassificationDataset, classified_points
from kerasnuc.losses import get_loss
from training import plots
from training.callbacks import fit_into_run
from training.config import FitConfig
from training.optimizers import make_optimizer

SEGMENTATION_LOSSES = ("bce_dice", "bce", "dice", "focal", "mse")


def classification_loss(config, log):
    """The loss name used: segmentation/regression losses (the default bce_dice) become
    'categorical' (sparse categorical cross-entropy on the softmax output)."""
    if config.loss in SEGMENTATION_LOSSES:
        log(f"classification: loss '{config.loss}' is not a classification loss; using 'categorical'")
        return "categorical"
    if config.loss != "categorical":
        raise ValueError(f"classification trains on integer class labels; loss '{config.loss}' "
                         "is not supported, use 'categorical'")
    return config.loss


def class_names_of(records):
    """The class names of the records (the first record that has them; all must agree)."""
    names = None
    for record in records:
        if record.classes is None or not record.class_names:
            continue
        if names is None:
            names = tuple(record.class_names)
        elif tuple(record.class_names) != names:
            raise ValueError(f"{record.name}: class names {tuple(record.class_names)} differ from {names}")
    if names is None:
        raise ValueError("classification: no record has classes and class names")
    return list(names)


def with_classes(records):
    """Records that have at least one classified nucleus."""
    return [r for r in records if len(classified_points(r)[1])]


def make_augmenter(config, log):
    """config.augment as an Augmenter; the untouched (segmentation) default becomes the patch
    default: dihedral transforms and HED stain jitter, no brightness/contrast."""
    if not config.augment:
        return None
    if config.augment == FitConfig().augment:
        log("classification: default augmentation -> dihedral + HED jitter 0.05 (patch default)")
        return "default"
    return Augmenter(**config.augment)


def build_model(config, num_classes, loss):
    if models.task_of(config.model) != "classification":
        raise ValueError(f"classification needs a patch classifier (dcrn, densenet), got "
                         f"'{config.model}' ({models.task_of(config.model)})")
    model = models.build(config.model, input_shape=(config.patch, config.patch, config.channels),
                         num_classes=num_classes, **dict(config.model_config))
    model.compile(optimizer=make_optimizer(config), loss=get_loss(loss),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def train(config, run, train_records, val_records, num_classes, loss, log):
    """Fit the model; the best epoch by validation loss is saved as model.keras."""
    model = build_model(config, num_classes, loss)
    log(f"model {config.model}: {model.count_params():,} parameters, {config.patch}x{config.patch} "
        f"patches, {num_classes} classes")
    train_data = ClassificationDataset(train_records, patch=config.patch, batch_size=config.batch_size,
                                       steps=config.steps_per_epoch or None, channels=config.channels,
                                       augmenter=make_augmenter(config, log), seed=config.seed,
                                       balanced=config.balanced,
                                       workers=config.workers)
    val_data = None
    if val_records:
        val_data = ClassificationDataset(val_records, patch=config.patch, batch_size=config.batch_size,
                                         channels=config.channels, evaluation=True)
    log(f"training: {len(train_data.classes)} nuclei in {len(train_records)} images, "
        f"{len(train_data)} batches of {config.batch_size} per epoch, {config.epochs} epochs"
        + (f"; validation {len(val_data.classes)} nuclei in {len(val_records)} images"
           if val_data is not None else ""))
    history = fit_into_run(model, run, train_data, val_data, config.epochs, log, config.time_budget,
                           init_weights=config.init_weights)
    return history


def engine_for(model, config):
    """The prediction engine over the trained classifier (patches and normalisation as
    ``ClassificationDataset(evaluation=True)``)."""
    from kerasnuc.predict.engine import Predictor
    from kerasnuc.predict.runtimes import KerasRuntime

    meta = {"channels": config.channels, "patch": config.patch, "output_channels": int(model.output_shape[-1])}
    return Predictor(KerasRuntime(model=model, meta=meta))


def plot_confusion(matrix, class_names, path, title=""):
    """confusion.png: counts, coloured by the share of each true class (row)."""
    plt = plots.pyplot(path)
    if plt is None:
        return
    matrix = np.asarray(matrix, dtype=np.float64)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 1.2 * len(class_names) + 1.8
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, f"{int(matrix[i, j])}\n{share[i, j]:.0%}", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _float(value):
    return float("nan") if value is None else float(value)


def run_task(config, run, records, split, log):
    """Train, evaluate on the test images' patches; writes model.keras, history.csv,
    curves.png, metrics.json and confusion.png into ``run``."""
    train_records, val_records, test_records = (with_classes(side) for side in records_of(records, split))
    if not train_records or not test_records:
        raise ValueError("classification: the train and test images need classified nuclei")
    class_names = class_names_of(records)
    loss = classification_loss(config, log)
    started = time.time()
    history = train(config, run, train_records, val_records, len(class_names), loss, log)
    train_seconds = time.time() - started
    plots.plot_history(history, run.file("curves.png"))
    model = keras.models.load_model(run.file("model.keras"))

    # the held-out score is training.evaluate's (one evaluator, one metrics.json layout)
    from training import evaluate as scorer

    engine = engine_for(model, config)
    passes = config.mc_samples if models.is_stochastic(model) else 1
    batch = max(config.batch_size, 64)
    result, _ = scorer.evaluate_classification(
        test_records, lambda image, points: engine.classify(image, points, batch_size=batch, samples=passes),
        class_names=class_names, num_classes=len(class_names), log=lambda message: None)
    report = {**result["pooled"], "per_class": result["per_class"]}
    run.write_json("metrics.json", {
        "split": "test", "images": len(test_records), **result, "primary": "pooled",
        "patch": config.patch, "loss": loss,
        "epochs": len(history.get("loss", [])), "train_seconds": round(train_seconds, 1),
        "best_val_loss": float(min(history["val_loss"])) if history.get("val_loss") else None,
    })
    plot_confusion(result["confusion_matrix"], class_names, run.file("confusion.png"),
                   f"{config.model}: test accuracy {report['accuracy']:.3f}, macro F1 {report['macro_f1']:.3f}")
    log(f"test ({len(test_records)} images, {report['n']} nuclei): accuracy {report['accuracy']:.3f}, "
        f"macro F1 {report['macro_f1']:.3f}, weighted F1 {report['weighted_f1']:.3f}, "
        f"macro AUC {_float(report.get('macro_roc_auc')):.3f}")
    summary = {k: _float(report.get(k)) for k in ("accuracy", "macro_f1", "weighted_f1", "macro_roc_auc",
                                                  "macro_average_precision")}
    summary.update({f"f1_{c['name']}": float(c["f1"]) for c in report["per_class"]})
    return {k: v for k, v in summary.items() if not np.isnan(v)}
