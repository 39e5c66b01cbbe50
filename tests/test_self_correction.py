"""Self-Correction (SCHP) training option and the SGD recipe's momentum (training.optimizers)."""

import json

import pytest

from training import fit
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
