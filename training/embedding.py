"""The segmentation task for embedding models (BayesNuSeg): instance-id targets, the
seed + embedding loss, seed-threshold tuning by AJI, and held-out scoring by the engine.

:func:`training.segmentation.run_task` hands over here for the families in ``FAMILIES``;
the run folder's layout is the same as every segmentation run's (model.keras,
history.csv, curves.png, thresholds.json with ``"method": "embedding"``, metrics.json with
pixel Dice (= pixel F1) and IoU, AJI, PQ and, for Monte-Carlo models, uncertainty
accuracy from the predictive variance of the seed map).

Targets: the crop's instance ids, renumbered 1..K per crop (so a fixed one-hot of
``max_instances`` ids covers any crop of an image with hundreds of nuclei) by
``skimage.measure.label`` of equal-id connected regions (a nucleus that a mirror-padded
small image repeats becomes two instances, not one in two places). The ids travel through
augmentation as int32, which :class:`kerasnuc.data.augment.Augmenter` resamples by nearest
neighbour (flips and rot90 exactly; free rotation and elastic deformation too, without
mixing ids), and become float32 only after renumbering.
"""


import numpy as np

from kerasnuc import models
from kerasnuc.data.splits import records_of
from kerasnuc.models.geometry import input_multiple
from kerasnuc.data.pipeline import SegmentationDataset
from kerasnuc.runs import thresholds_record

FAMILIES = ("bayesnuseg",)
SEED_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
FOREGROUND_THRESHOLDS = (0.3, 0.5)
DEFAULT_POSTPROCESS = {"method": "embedding", "threshold": 0.5, "seed_threshold": 0.5, "score_threshold": 0.5,
                       "min_area": 10, "min_unclustered": 0.5}
POSTPROCESS_KEYS = tuple(DEFAULT_POSTPROCESS) + ("offset_scale", "classes")


def handles(config):
    """True if ``config.model`` is trained by this module."""
    return config.model in FAMILIES


def instance_target(labels):
    """(H, W, 1) int32 instance ids of a whole image (renumbered per crop by the dataset)."""
    return np.asarray(labels, np.int32)[..., None]


class EmbeddingDataset(SegmentationDataset):
    """:class:`SegmentationDataset` of crops with their instance ids renumbered 1..K per crop (float32)."""

    def __init__(self, records, **kwargs):
        super().__init__(records, target=instance_target, **kwargs)

    def __getitem__(self, index):
        from skimage.measure import label

        x, y = super().__getitem__(index)
        ids = np.stack([label(crop[..., 0], background=0, connectivity=1) for crop in y])
        return x, ids[..., None].astype(np.float32)


def loss_of(config):
    """The family's loss with the run's loss_options (lambdas, offset_scale, max_instances)."""
    from kerasnuc.losses import get_loss

    classes = int(config.model_config.get("classes", models.default_config(config.model).get("classes", 1)))
    options = {k: v for k, v in (config.loss_options or {}).items() if k != "classes"}
    try:
        return get_loss("bayesnuseg", classes=classes, **options)
    except TypeError as error:
        raise ValueError(f"loss_options for {config.model}: {error}") from None


def build_model(config):
    from training.optimizers import make_optimizer

    model = models.build(config.model, input_shape=(None, None, config.channels), **dict(config.model_config))
    model.compile(optimizer=make_optimizer(config), loss=loss_of(config))
    return model


def train(config, run, train_records, val_records, log):
    """Fit; the best epoch by validation loss is saved as model.keras."""
    from training.callbacks import fit_into_run

    multiple = input_multiple(config.model, config.model_config)
    if config.loss != config.model:
        log(f"loss: {config.model} trains with its own loss ('{config.model}'), not '{config.loss}'")
    model = build_model(config)
    log(f"model {config.model}: {model.count_params():,} parameters, input multiple {multiple}, "
        f"output {model.output_shape[-1]} channels (seed..., offset_y, offset_x, sigma)")
    from training.segmentation import crop_datasets

    train_data, val_data = crop_datasets(EmbeddingDataset, config, train_records, val_records)
    log(f"training: {len(train_data)} batches of {config.batch_size} x {config.tile}^2 per epoch, "
        f"{config.epochs} epochs")
    history = fit_into_run(model, run, train_data, val_data, config.epochs, log, config.time_budget,
                           init_weights=config.init_weights)
    return history, multiple


def postprocess_defaults(config):
    """Clustering parameters: the defaults, the config's postprocess values for these keys,
    and the loss's offset_scale and class count (the maps mean nothing without them)."""
    loss = loss_of(config)
    given = {k: v for k, v in (config.postprocess or {}).items() if k in POSTPROCESS_KEYS}
    return {**DEFAULT_POSTPROCESS, **given, "method": "embedding", "offset_scale": loss.offset_scale,
            "classes": loss.classes}


def tune_postprocess(maps, records, defaults, log):
    """Grid-search seed_threshold and the foreground threshold for the best mean AJI."""
    from kerasnuc.predict.postprocess import instances
    from training.segmentation import best_by_aji

    best, best_score = best_by_aji(defaults, {"seed_threshold": SEED_THRESHOLDS, "threshold": FOREGROUND_THRESHOLDS},
                                   lambda params, i: instances(maps[i], params), records)
    log(f"clustering tuned on {len(records)} validation images: seed_threshold {best['seed_threshold']}, "
        f"threshold {best['threshold']} (AJI {best_score:.3f})")
    return best, best_score


def _add_ua(summary, result):
    """BayesNuSeg's uncertainty accuracy (UA), from the predictive variance over all test pixels."""
    for key in ("ua_variance_pooled", "ua_entropy_pooled"):
        if result.get("uncertainty", {}).get(key) is not None:
            summary[key] = float(result["uncertainty"][key])
    if "ua_variance_pooled" in summary:
        summary["ua"] = summary["ua_variance_pooled"]


def run_task(config, run, records, split, log):
    """Train, tune, evaluate (as :func:`training.segmentation.run_task`, with this family's
    target, loss and clustering)."""
    from training import evaluate as scorer
    from training.segmentation import score_held_out, train_and_reload

    train_records, val_records, test_records = records_of(records, split)
    history, multiple, model, train_seconds = train_and_reload(train, config, run, train_records, val_records, log)
    passes = config.mc_samples if models.is_stochastic(model) else 1
    settings = scorer.Settings(channels=config.channels, multiple=multiple, mc_samples=passes)
    engine = scorer.engine_for(model, settings)

    params, val_score = postprocess_defaults(config), None
    if config.tune_postprocess and val_records:
        maps = [engine.predict_maps(r.image, tile=0, samples=passes)[0] for r in val_records]
        params, val_score = tune_postprocess(maps, val_records, params, log)
    run.write_json("thresholds.json", thresholds_record("segmentation", params, "aji", val_score))

    summary, _ = score_held_out(run, model, engine, settings, test_records, params, history, train_seconds,
                                pooled=("dice", "iou"), record={"mc_samples": passes}, summarise=_add_ua)
    log(f"test ({len(test_records)} images): pixel F1 (Dice) {summary.get('dice', float('nan')):.3f}, "
        f"IoU {summary.get('iou', float('nan')):.3f}, AJI {summary.get('aji', float('nan')):.3f}, "
        f"PQ {summary.get('pq', float('nan')):.3f}"
        + (f", UA {summary['ua']:.3f}" if "ua" in summary else ""))
    return summary
