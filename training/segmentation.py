"""The segmentation task: train on crops, tune post-processing on validation images,
score instances on held-out images."""

import itertools
import time

import keras
import numpy as np

from kerasnuc import metrics, models
from kerasnuc.data.augment import Augmenter
from kerasnuc.data.splits import records_of
from kerasnuc.data.pipeline import SegmentationDataset
from kerasnuc.losses import get_loss
from kerasnuc.models.geometry import input_multiple
from kerasnuc.postprocess import instances_from_probability
from kerasnuc.runs import thresholds_record
from training import plots
from training.callbacks import fit_into_run
from training.optimizers import make_optimizer

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
MIN_DISTANCES = (2, 3, 5, 8)
BOUNDARY_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)  # the best was at the edge of (0.3, 0.5, 0.7) for fluo and he


def build_model(config):
    model_config = dict(config.model_config)
    model = models.build(config.model, input_shape=(None, None, config.channels), **model_config)
    return compile_model(model, config)


def compile_model(model, config, iou=None):
    """The optimizer, loss and metrics of the run (also for Self-Correction's models; ``iou``
    replaces the BinaryIoU metric)."""
    if iou is None:
        iou = (keras.metrics.OneHotIoU(num_classes=3, target_class_ids=[1, 2], name="iou")
               if config.target == "three_class" else keras.metrics.BinaryIoU(target_class_ids=[1], name="iou"))
    model.compile(optimizer=make_optimizer(config), loss=get_loss(config.loss, **config.loss_options),
                  metrics=[iou])
    return model


def train(config, run, train_records, val_records, log):
    """Fit the model; the best epoch by validation loss is saved as model.keras."""
    multiple = input_multiple(config.model, config.model_config)
    model = build_model(config)
    log(f"model {config.model}: {model.count_params():,} parameters, input multiple {multiple}")
    augmenter = Augmenter(**config.augment) if config.augment else None
    train_data = SegmentationDataset(train_records, tile=config.tile, batch_size=config.batch_size,
                                     steps=config.steps_per_epoch or None, channels=config.channels,
                                     augmenter=augmenter, seed=config.seed, workers=config.workers,
                                     target=config.target)
    val_data = SegmentationDataset(val_records, tile=config.tile, batch_size=config.batch_size,
                                   channels=config.channels, seed=config.seed + 1, target=config.target)
    log(f"training: {len(train_data)} batches of {config.batch_size} x {config.tile}^2 per epoch, "
        f"{config.epochs} epochs")
    if config.self_correction:
        from training.self_correction import SelfCorrection

        if config.init_weights:
            from training.warm_start import load_initial_weights

            load_initial_weights(model, config.init_weights, log)
        history = SelfCorrection(config, run, model, train_data, val_data, train_records, multiple, log).fit()
    else:
        history = fit_into_run(model, run, train_data, val_data, config.epochs, log, config.time_budget,
                               init_weights=config.init_weights)
    return history, multiple


def predict_probabilities(model, records, config, multiple):
    """Foreground probability (H, W) per image, or the (H, W, 3) softmax of a three-class model
    (the watershed seeds it from the inside channel); MC models average ``mc_samples`` passes."""
    return [maps[..., 0] if maps.shape[-1] == 1 else maps for maps in predict_maps(model, records, config, multiple)]


def predict_maps(model, records, config, multiple):
    """The model's (H, W, K) output maps of each whole image, through the prediction engine;
    MC models average ``mc_samples`` passes."""
    engine = held_out_engine(model, config, multiple)
    passes = config.mc_samples if models.is_stochastic(model) else 1
    return [engine.predict_maps(record.image, tile=0, samples=passes)[0] for record in records]


def held_out_engine(model, config, multiple):
    """The prediction engine over the model being trained (whole images, untiled)."""
    from kerasnuc.predict.engine import Predictor
    from kerasnuc.predict.runtimes import KerasRuntime

    return Predictor(KerasRuntime(model=model, meta={"channels": config.channels, "multiple": multiple}))


def tune_postprocess(probabilities, records, defaults, log):
    """Grid-search threshold and marker distance (three-class maps: the boundary level that cuts the
    inside cores into markers) for the best mean AJI on validation images."""
    three_class = probabilities and probabilities[0].ndim == 3
    grid = {"threshold": THRESHOLDS, **({"boundary_threshold": BOUNDARY_THRESHOLDS} if three_class
                                        else {"min_distance": MIN_DISTANCES})}
    best, best_score = best_by_aji(defaults, grid,
                                   lambda params, i: instances_from_probability(probabilities[i], **params), records)
    log(f"post-processing tuned on {len(records)} validation images: {best} (AJI {best_score:.3f})")
    return best, best_score


def crop_datasets(dataset_class, config, train_records, val_records, **options):
    """(training, validation) datasets of random crops for the instance-target families: training
    augmented on ``config.workers`` workers; validation fixed crops (its own seed) with as many
    batches as an epoch trains (``steps_per_epoch``), else one pass; None without validation images.
    ``options``: further dataset arguments for both (e.g. ``model_config``)."""
    augmenter = Augmenter(**config.augment) if config.augment else None
    common = {"tile": config.tile, "batch_size": config.batch_size, "channels": config.channels,
              "steps": config.steps_per_epoch or None, **options}
    train_data = dataset_class(train_records, augmenter=augmenter, seed=config.seed, workers=config.workers,
                               **common)
    val_data = dataset_class(val_records, seed=config.seed + 1, **common) if val_records else None
    return train_data, val_data


def train_and_reload(train_fn, config, run, train_records, val_records, log):
    """Run ``train_fn`` (a task's ``train``), plot its curves and reload the saved best model:
    (history, input multiple, model, training seconds)."""
    started = time.time()
    history, multiple = train_fn(config, run, train_records, val_records, log)
    train_seconds = time.time() - started
    plots.plot_history(history, run.file("curves.png"))
    return history, multiple, keras.models.load_model(run.file("model.keras")), train_seconds


def run_task(config, run, records, split, log):
    """Train, tune, evaluate; writes model.keras, history.csv, curves.png, thresholds.json,
    metrics.json and overlay.png into ``run``."""
    from training import embedding

    if embedding.handles(config):  # BayesNuSeg: instance-id targets, its own loss, clustering
        if config.self_correction:
            import sys

            sys.exit(f"training.fit: --self-correction refines map targets; model {config.model} trains on "
                     "instance ids (not supported)")
        return embedding.run_task(config, run, records, split, log)
    train_records, val_records, test_records = records_of(records, split)
    history, multiple, model, train_seconds = train_and_reload(train, config, run, train_records, val_records, log)

    params = dict(config.postprocess)
    val_score = None
    if config.tune_postprocess and val_records:
        val_probabilities = predict_probabilities(model, val_records, config, multiple)
        params, val_score = tune_postprocess(val_probabilities, val_records, params, log)
    run.write_json("thresholds.json", thresholds_record("segmentation", params, "aji", val_score))

    # the held-out score is training.evaluate's (one evaluator, one metrics.json layout)
    from training import evaluate as scorer

    settings = scorer.Settings(channels=config.channels, multiple=multiple,
                               mc_samples=config.mc_samples if models.is_stochastic(model) else 1)
    engine = scorer.engine_for(model, settings)
    summary, _ = score_held_out(run, model, engine, settings, test_records, params, history, train_seconds)
    log(f"test ({len(test_records)} images): Dice {summary['dice']:.3f}, AJI {summary['aji']:.3f}, "
        f"PQ {summary.get('pq', float('nan')):.3f}")
    return summary


def best_by_aji(defaults, grid, labels_of, records):
    """Grid search of post-processing parameters for the best mean AJI on ``records`` (validation):
    ``grid`` {name: values}; ``labels_of(params, index)`` the instances of record ``index`` under
    ``params`` (from network outputs computed once). Returns (best params, its mean AJI)."""
    names = list(grid)
    best, best_score = dict(defaults), -1.0
    for values in itertools.product(*(grid[name] for name in names)):
        params = {**defaults, **dict(zip(names, values))}
        score = float(np.mean([metrics.aggregated_jaccard_index(r.labels, labels_of(params, i))
                               for i, r in enumerate(records)]))
        if score > best_score:
            best, best_score = params, score
    return best, best_score


def score_held_out(run, model, engine, settings, test_records, params, history, train_seconds,
                   pooled=("dice",), record=None, summarise=None):
    """The held-out score of every instance family (U-Net ... BayesNuSeg, Mask R-CNN): training.evaluate's
    evaluator through the engine, one metrics.json layout, overlay.png of the best, median and worst test
    image. ``pooled``: pooled figures copied into the summary as ``<name>_pooled``; ``record``: extra
    metrics.json keys; ``summarise(summary, result)``: adds a family's own figures to the summary before
    it is written. Returns (summary, the evaluator's result)."""
    from training import evaluate as scorer

    result, artifacts = scorer.evaluate_segmentation(
        test_records, lambda image: scorer.predict_record(model, image, settings, engine), params, settings,
        log=lambda message: None)
    summary, per_image, found = dict(result["mean"]), result["per_image"], artifacts["instances"]
    for key in pooled:
        summary[f"{key}_pooled"] = float(result["pooled"][key])
    if summarise is not None:
        summarise(summary, result)
    run.write_json("metrics.json", {
        "split": "test", "images": len(test_records), **result, "mean": summary,
        "postprocess": params, "epochs": len(history.get("loss", [])),
        "train_seconds": round(train_seconds, 1), **(record or {}),
        "best_val_loss": float(min(history["val_loss"])) if history.get("val_loss") else None,
    })
    if test_records:
        picks = artifacts["picks"]
        panels = [plots.overlay(test_records[i].image, test_records[i].labels, found[i]) for i in picks]
        titles = [f"{test_records[i].name[:10]} AJI {per_image[i]['aji']:.2f}" for i in picks]
        plots.save_overlays(panels, run.file("overlay.png"), titles)
    return summary, result
