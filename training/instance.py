"""The instance task (Mask R-CNN): crops of the model's input size -> box and mask targets ->
the family's trainer; score and mask thresholds tuned on validation images, held-out images
scored through the prediction engine.

    python -m training.fit --model maskrcnn --data dsb2018:../shared/data/dsb2018/stage1_train

``tile`` is the model's (square, static) input size: the network is built for it, trained on
crops of it and the engine tiles images to it. The crops come from
:class:`training.embedding.EmbeddingDataset` (the instance ids of a crop, augmented by nearest
neighbour and renumbered 1..K), and :func:`kerasnuc.models.maskrcnn.training_targets` turns each
into fixed-shape targets. ``build_trainer(model)`` shares the inference model's layers and
computes its losses inside (RPN class + box, head class + box, mask BCE), so the run is compiled
with an optimizer only; the INFERENCE model is what is saved as model.keras (best epoch by
validation loss) and exported.

The run folder is every segmentation run's: model.keras, history.csv, curves.png,
thresholds.json (``score_threshold``, ``mask_threshold``, ``min_area``), metrics.json (the
instance metrics of :func:`training.evaluate.evaluate_segmentation`: Dice, IoU, AJI, PQ,
precision / recall / F1 of matched nuclei) and overlay.png.
"""


import numpy as np

from kerasnuc import models
from kerasnuc.data.splits import records_of
from kerasnuc.runs import thresholds_record
from training.embedding import EmbeddingDataset

SCORE_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
MASK_THRESHOLDS = (0.4, 0.5, 0.6)


def model_config_of(config):
    """The builder's keyword arguments: the run's model_config with the input fixed at the
    run's tile (``input_shape`` in model_config is refused: ``tile`` says it)."""
    given = dict(config.model_config)
    if "input_shape" in given:
        raise ValueError(f"model_config input_shape {given['input_shape']}: the instance task builds the model "
                         f"for the tile (--tile {config.tile}); drop input_shape")
    return {**given, "input_shape": (int(config.tile), int(config.tile), int(config.channels))}


class InstanceDataset(EmbeddingDataset):
    """Random ``tile`` crops with the targets of ``training_targets``: batches of
    ({"image": (B, tile, tile, C), target name: (B, ...) ...},), the trainer's inputs."""

    def __init__(self, records, model_config, **kwargs):
        super().__init__(records, **kwargs)
        from kerasnuc.models.maskrcnn import training_targets

        self.model_config, self.training_targets = dict(model_config), training_targets

    def __getitem__(self, index):
        x, ids = super().__getitem__(index)
        rng = np.random.default_rng([self.seed, self.epoch, int(index), 1])  # anchor sampling, reproducible
        targets = [self.training_targets(crop[..., 0].astype(np.int32), self.model_config, rng) for crop in ids]
        batch = {name: np.stack([t[name] for t in targets]) for name in targets[0]}
        return ({"image": x.astype(np.float32), **batch},)


def build(config):
    """(inference model, compiled trainer) of the run's family."""
    from kerasnuc.models.maskrcnn import build_trainer
    from training.optimizers import make_optimizer

    model = models.build(config.model, **model_config_of(config))
    trainer = build_trainer(model, seed=config.seed, **model_config_of(config))
    trainer.compile(optimizer=make_optimizer(config))
    return model, trainer


def train(config, run, train_records, val_records, log):
    """Fit the trainer; the inference model of the best epoch (validation loss) is saved as
    model.keras. Returns (history, input multiple)."""
    from kerasnuc.models.geometry import input_multiple
    from training.callbacks import fit_into_run

    if config.loss != "bce_dice":
        log(f"loss: {config.model} trains with its own losses (RPN, head, mask), not '{config.loss}'")
    model, trainer = build(config)
    multiple = input_multiple(config.model, config.model_config)
    log(f"model {config.model}: {model.count_params():,} parameters, input {config.tile}x{config.tile} "
        f"(multiple {multiple})")
    from training.segmentation import crop_datasets

    train_data, val_data = crop_datasets(InstanceDataset, config, train_records, val_records,
                                         model_config=model_config_of(config))
    log(f"training: {len(train_data)} batches of {config.batch_size} x {config.tile}^2 per epoch, "
        f"{config.epochs} epochs")
    history = fit_into_run(trainer, run, train_data, val_data, config.epochs, log, config.time_budget, save=model,
                           init_weights=config.init_weights)
    return history, multiple


def postprocess_defaults(config):
    """score_threshold, mask_threshold and min_area: the defaults under the config's values."""
    from kerasnuc.predict.detections import instance_params

    return {**instance_params(config.postprocess), "method": "detections"}


def tune_postprocess(engine, records, defaults, log):
    """Grid-search score and mask thresholds for the best mean AJI on validation images; the
    network runs once per image (:func:`kerasnuc.predict.detections.detect`)."""
    from kerasnuc.predict.detections import detect, instances_from_tiles
    from training.segmentation import best_by_aji

    found = [detect(engine, record.image) for record in records]
    best, best_score = best_by_aji(defaults, {"score_threshold": SCORE_THRESHOLDS, "mask_threshold": MASK_THRESHOLDS},
                                   lambda params, i: instances_from_tiles(found[i], params), records)
    log(f"thresholds tuned on {len(records)} validation images: score {best['score_threshold']}, "
        f"mask {best['mask_threshold']} (AJI {best_score:.3f})")
    return best, best_score


def run_task(config, run, records, split, log):
    """Train, tune, evaluate; writes model.keras, history.csv, curves.png, thresholds.json,
    metrics.json and overlay.png into ``run``."""
    from training import evaluate as scorer
    from training.segmentation import score_held_out, train_and_reload

    if config.self_correction:
        import sys

        sys.exit(f"training.fit: --self-correction refines map targets; {config.model} trains on boxes and masks")
    train_records, val_records, test_records = records_of(records, split)
    history, multiple, model, train_seconds = train_and_reload(train, config, run, train_records, val_records, log)
    settings = scorer.Settings(channels=config.channels, multiple=multiple)
    params, val_score = postprocess_defaults(config), None
    engine = scorer.engine_for(model, settings, postprocess=params)
    if config.tune_postprocess and val_records:
        params, val_score = tune_postprocess(engine, val_records, params, log)
    run.write_json("thresholds.json", thresholds_record("instance", params, "aji", val_score))

    engine.meta["postprocess"] = dict(params)
    summary, _ = score_held_out(run, model, engine, settings, test_records, params, history, train_seconds,
                                pooled=("dice", "f1"))
    log(f"test ({len(test_records)} images): Dice {summary.get('dice', float('nan')):.3f}, "
        f"AJI {summary.get('aji', float('nan')):.3f}, PQ {summary.get('pq', float('nan')):.3f}, "
        f"F1 {summary.get('f1', float('nan')):.3f}")
    return summary
