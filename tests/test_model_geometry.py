"""kerasnuc.models.geometry: the one rule for a family's input multiple (padding, tiles, checks)."""

import pytest

from kerasnuc.models.geometry import FIXED_MULTIPLES, input_multiple
from kerasnuc.runs import model_multiple
from training.config import FitConfig


def test_depth_families_pad_to_two_to_the_depth():
    assert input_multiple("unet", {"depth": 3}) == 8
    assert input_multiple("unet") == 2 ** 4  # the builder's default depth
    assert model_multiple({"model": "segnet", "model_config": {"depth": 2}}) == 4


def test_fixed_encoders_and_patch_classifiers():
    for name, multiple in FIXED_MULTIPLES.items():
        assert input_multiple(name, {"depth": 1}) == multiple  # their encoder fixes it
    assert input_multiple("dcrn") == 1
    assert input_multiple("no-such-family") == 1


def test_training_rejects_a_tile_the_model_cannot_take():
    with pytest.raises(ValueError, match="tile 40 must be divisible by the input multiple 16 of unet"):
        FitConfig(model="unet", model_config={"depth": 4}, tile=40).validate()
    FitConfig(model="unet", model_config={"depth": 4}, tile=64).validate()
