"""Working memory per input pixel, from a model's widest activation (kerasnuc/models/memory.py)."""

from kerasnuc import models
from kerasnuc.models.memory import WORKING_FACTOR, widest_activation_bytes, working_bytes_per_pixel


def test_widest_activation_follows_the_models_width():
    """A U-Net's widest output is its last decoder level at full resolution (skip + upsampled:
    2 x filters floats per pixel): doubling the filters doubles it."""
    narrow = models.build("unet", input_shape=(None, None, 3), filters=4, depth=3)
    wide = models.build("unet", input_shape=(None, None, 3), filters=8, depth=3)
    assert widest_activation_bytes(narrow) == 2 * 4 * 4
    assert widest_activation_bytes(wide) == 2 * 8 * 4
    assert working_bytes_per_pixel(wide) == WORKING_FACTOR * 64


def test_a_subsampling_network_counts_its_widest_map_per_input_pixel():
    """UD-Net's widest map is measured per input pixel, whatever its resolution."""
    udnet = models.build("udnet", input_shape=(None, None, 3), filters=4, depth=2)
    value = widest_activation_bytes(udnet)
    assert value is not None and value > 0
