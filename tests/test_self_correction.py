"""Self-Correction (SCHP) training option and the SGD recipe's momentum (training.optimizers)."""

import csv
import json
import math
import zipfile

import keras
import numpy as np
import pytest

from kerasnuc import models
from kerasnuc.data import load_dataset
from kerasnuc.data.pipeline import SegmentationDataset
from kerasnuc.data.targets import foreground
from training import fit
from training import self_correction as sc
from training.config import FitConfig, resolve
from training.optimizers import make_optimizer


def test_sgd_takes_the_configured_momentum():
    config = resolve(overrides={"optimizer": "sgd", "learning_rate": 0.1, "momentum": 0.99,
                                "weight_decay": 1e-8, "batch_size": 2})
    optimizer = make_optimizer(config)
    assert optimizer.__class__.__name__ == "SGD" and optimizer.momentum == pytest.approx(0.99)
    assert optimizer.weight_decay == pytest.approx(1e-8)
    assert float(optimizer.learning_rate) == pytest.approx(0.1)
    assert make_optimizer(resolve(overrides={"optimizer": "sgd"})).momentum == pytest.approx(0.9)


def test_momentum_flag_and_its_bounds():
    args = fit.build_parser().parse_args(["--optimizer", "sgd", "--momentum", "0.99"])
    assert args.momentum == 0.99
    with pytest.raises(ValueError, match="momentum"):
        resolve(overrides={"momentum": 1.0})


def test_an_old_runs_config_without_momentum_still_loads(tmp_path):
    values = {k: v for k, v in FitConfig().to_dict().items() if k != "momentum"}
    values.update(optimizer="sgd", precision_used="float32")
    assert FitConfig.from_dict(values).momentum == 0.9
    partial = tmp_path / "old.incomplete"
    partial.mkdir()
    (partial / "config.json").write_text(json.dumps(values))
    config = fit.resume_config(str(partial))
    assert config.momentum == 0.9 and config.optimizer == "sgd" and config.out == str(tmp_path / "old")


# --- Self-Correction --------------------------------------------------------------------------


def _tiny_unet():
    return models.build("unet", input_shape=(None, None, 3), filters=4, depth=2)


@pytest.fixture(scope="module")
def sample_records():
    return load_dataset("sample")[:4]


def test_cycle_learning_rate_restarts_and_follows_the_cosine():
    config = resolve(overrides={"epochs": 2, "learning_rate": 0.1, "self_correction": 3,
                                "self_correction_epochs": 4, "self_correction_lr_max": 0.5,
                                "self_correction_lr_min": 0.01})
    schedule = [sc.epoch_schedule(config, e) for e in range(2 + 3 * 4)]
    assert schedule[:2] == [(None, 0), (None, 0)]  # the warm-up keeps the optimizer's rate
    lr_max, lr_min = 0.05, 0.001
    for cycle in (1, 2, 3):
        rows = schedule[2 + (cycle - 1) * 4: 2 + cycle * 4]
        assert [c for _, c in rows] == [cycle] * 4
        rates = [lr for lr, _ in rows]
        assert rates[0] == pytest.approx(lr_max)  # restart at the top of every cycle
        assert all(a > b for a, b in zip(rates, rates[1:]))  # falls within the cycle
        assert all(lr_min < r <= lr_max for r in rates)
        for k, rate in enumerate(rates):
            assert rate == pytest.approx(lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi * k / 4)) / 2)
        assert rates[2] == pytest.approx((lr_max + lr_min) / 2)  # half-way down at half the cycle


def test_weight_average_is_the_mean_of_the_cycle_end_weights():
    model = _tiny_unet()
    kernel = next(w for w in model.trainable_weights if len(w.shape) == 4)
    average = sc.WeightAverage(model)
    seen = [keras.ops.convert_to_numpy(kernel).copy()]
    rng = np.random.default_rng(0)
    for _ in range(3):  # three "cycle ends", each with other weights
        model.set_weights([w + rng.normal(0, 0.1, w.shape).astype(w.dtype) for w in model.get_weights()])
        seen.append(keras.ops.convert_to_numpy(kernel).copy())
        moved, relative = average.add(model)
        assert moved > 0 and 0 < relative < 1
    index = [id(w) for w in model.weights].index(id(kernel))
    averaged = keras.ops.convert_to_numpy(average.model.weights[index])
    np.testing.assert_allclose(averaged, np.mean(seen, axis=0), rtol=1e-5, atol=1e-6)
    assert average.count == 4
    assert not np.allclose(averaged, seen[-1])


def test_batchnorm_statistics_are_re_estimated_as_the_mean_of_batch_statistics():
    model = _tiny_unet()
    norm = next(layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization))
    before_norm = keras.Model(model.inputs[0], norm.input)  # only convolutions before the first BatchNorm
    rng = np.random.default_rng(1)
    batches = [rng.random((2, 32, 32, 3), dtype=np.float32) for _ in range(3)]
    momentum = norm.momentum
    assert sc.reestimate_batchnorm(model, iter(batches)) == 3
    features = [keras.ops.convert_to_numpy(before_norm(b)) for b in batches]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(norm.moving_mean),
                               np.mean([f.mean(axis=(0, 1, 2)) for f in features], axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(norm.moving_variance),
                               np.mean([f.var(axis=(0, 1, 2)) for f in features], axis=0), rtol=1e-3, atol=1e-6)
    assert norm.momentum == momentum


def test_labels_after_a_cycle_are_the_blend_of_labels_and_prediction(sample_records):
    data = SegmentationDataset(sample_records, tile=64, batch_size=2, steps=1)
    original = [t.copy() for t in data.targets]
    rng = np.random.default_rng(2)
    predictions = [rng.random(t.shape).astype(np.float32) for t in original]
    change = sc.refine_labels(data, predictions, m=1)
    for y, p, new in zip(original, predictions, data.targets):
        np.testing.assert_allclose(new, (y + p) / 2, atol=1e-6)
    assert change == pytest.approx(np.mean(np.concatenate([np.abs((y + p) / 2 - y).ravel()
                                                           for y, p in zip(original, predictions)])), rel=1e-5)
    once = [t.copy() for t in data.targets]
    sc.refine_labels(data, [np.full(t.shape, 0.25, np.float32) for t in original], m=2)
    for y, new in zip(once, data.targets):
        np.testing.assert_allclose(new, (2 * y + 0.25) / 3, atol=1e-6)
    # crops are drawn from the refined targets: soft values reach the batches
    _, y = data[0]
    assert np.any((y > 0.01) & (y < 0.99))
    assert all(np.array_equal(r.labels > 0, o[..., 0] > 0) for r, o in zip(sample_records, original))
    with pytest.raises(ValueError, match="shape"):
        data.replace_targets([t[:10] for t in data.targets])


def test_time_budget_counts_the_time_between_fit_calls():
    from types import SimpleNamespace

    from training.callbacks import TimeBudget

    for elapsed, stops in ((50.0, False), (56.0, True)):  # 1 min budget, epochs of 5 s so far
        budget = TimeBudget(1.0, log=lambda message: None)
        budget.restore([5.0, 5.0], elapsed=elapsed)
        budget.on_train_begin()  # a later fit call: the warm-up and the averaging stay spent
        budget.set_model(SimpleNamespace(stop_training=False))
        budget.on_epoch_begin(2)
        budget.on_epoch_end(2)
        assert budget.model.stop_training is stops and len(budget.durations) == 3


def test_resume_and_distribute_are_refused_for_self_correction(tmp_path):
    with pytest.raises(ValueError, match="distribute"):
        resolve(overrides={"self_correction": 2, "distribute": "auto"})
    with pytest.raises(ValueError, match="segmentation"):
        resolve(overrides={"self_correction": 2, "task": "detection"})
    partial = tmp_path / "sc.incomplete"
    partial.mkdir()
    (partial / "config.json").write_text(json.dumps({**FitConfig().to_dict(), "self_correction": 2}))
    with pytest.raises(ValueError, match="cannot be resumed"):
        fit.resume_config(str(partial))


class _Spy:
    """Records what the real run's self-correction does (its instance, cycle-end weights, refinements)."""

    def __init__(self, monkeypatch):
        self.instances, self.kernels, self.refinements = [], [], []
        spy = self

        class Average(sc.WeightAverage):
            def __init__(self, model, compile_model=None):
                spy.kernels.append(spy.kernel(model))
                super().__init__(model, compile_model)

            def add(self, model):
                spy.kernels.append(spy.kernel(model))
                return super().add(model)

        class Recording(sc.SelfCorrection):
            def fit(self):
                spy.instances.append(self)
                return super().fit()

        real_refine = sc.refine_labels

        def refine(dataset, predictions, m):
            before = [t.copy() for t in dataset.targets]
            change = real_refine(dataset, predictions, m)
            spy.refinements.append((dataset, before, [p.copy() for p in predictions], m,
                                    [t.copy() for t in dataset.targets]))
            return change

        monkeypatch.setattr(sc, "WeightAverage", Average)
        monkeypatch.setattr(sc, "SelfCorrection", Recording)
        monkeypatch.setattr(sc, "refine_labels", refine)

    @staticmethod
    def kernel(model):
        return keras.ops.convert_to_numpy(next(w for w in model.weights if len(w.shape) == 4)).copy()


def test_a_short_run_with_two_cycles(tmp_path, monkeypatch):
    spy = _Spy(monkeypatch)
    out = tmp_path / "sc"
    fit.main(["--model-config", '{"filters": 4, "depth": 2}', "--tile", "64", "--batch-size", "2",
              "--steps-per-epoch", "2", "--epochs", "1", "--self-correction", "2",
              "--self-correction-epochs", "2", "--learning-rate", "0.01", "--out", str(out)])
    record = json.load(open(out / "self_correction.json"))
    assert record["cycles"] == 2 and [c["cycle"] for c in record["per_cycle"]] == [1, 2]
    assert record["model_saved"] == "averaged"
    assert [c["models_averaged"] for c in record["per_cycle"]] == [2, 3]
    for row in record["per_cycle"]:
        assert row["weights_moved"] > 0 and row["label_change"] > 0 and row["batchnorm_batches"] == 2
        assert row["learning_rate"][0] == pytest.approx(0.01) and row["learning_rate"][1] < 0.01
        assert math.isfinite(row["val_loss_averaged"])
    assert json.load(open(out / "config.json"))["self_correction"] == 2
    with open(out / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(float(r["cycle"])) for r in rows] == [0, 1, 1, 2, 2]
    config = FitConfig.from_run(str(out))
    for epoch, row in enumerate(rows[1:], start=1):
        assert float(row["learning_rate"]) == pytest.approx(sc.epoch_schedule(config, epoch)[0], rel=1e-6)

    # the saved model is the average of the warm-up and cycle-end models (BatchNorm re-estimated)
    model = keras.models.load_model(out / "model.keras", safe_mode=True)
    with zipfile.ZipFile(out / "model.keras") as archive:  # loads without training/ imported
        assert "RefinedLabelIoU" not in archive.read("config.json").decode()
    assert float(rows[-1]["iou"]) > 0  # the training iou counts refined labels >= 0.5 as nuclei
    assert len(spy.kernels) == 3
    np.testing.assert_allclose(_Spy.kernel(model), np.mean(spy.kernels, axis=0), rtol=1e-5, atol=1e-6)

    # training labels were refined twice by the blend formula; validation (and test) labels never
    run = spy.instances[0]
    assert [r[3] for r in spy.refinements] == [1, 2] and all(r[0] is run.train_data for r in spy.refinements)
    for _, before, predictions, m, after in spy.refinements:
        for y, p, new in zip(before, predictions, after):
            np.testing.assert_allclose(new, (m * y + p) / (m + 1), atol=1e-6)
    by_name = {r.name: r for r in load_dataset("sample")}
    split = json.load(open(out / "split.json"))
    val_truth = [foreground(by_name[n].labels) for n in split["val"]]
    assert all(np.array_equal(t, v) for t, v in zip(run.val_data.targets, val_truth))
    train_truth = [foreground(by_name[n].labels) for n in split["train"]]
    assert all(not np.array_equal(t, v) for t, v in zip(run.train_data.targets, train_truth))
    assert all(np.array_equal(r.labels, by_name[r.name].labels) for r in run.train_records)
    # p is the averaged model's whole-image prediction: the last one is the saved model's
    from training.segmentation import predict_maps

    final = predict_maps(model, run.train_records[:2], config, 4)
    for p, q in zip(spy.refinements[-1][2][:2], final):
        np.testing.assert_allclose(p, q, atol=1e-4)
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["epochs"] == 5 and 0 <= metrics["mean"]["dice"] <= 1
