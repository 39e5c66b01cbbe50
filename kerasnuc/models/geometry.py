"""The input multiple of a model family: the one rule for how much an image is padded.

Encoder-decoders with a ``depth`` option halve the resolution ``depth`` times, so sizes must
be multiples of ``2**depth``. Families with a fixed encoder (VGG-16, ResNet, the Tiramisu's
five transitions down) declare their multiple here. Training (tile check), evaluation, the
prediction engine, the model checks and the exports all ask :func:`input_multiple`.
"""

# families whose encoder fixes the down-sampling (five stride-2 stages: 32)
FIXED_MULTIPLES = {"fcn8": 32, "fc_densenet": 32, "pspsegnet": 32, "ce2p": 32,
                   "maskrcnn": 64}  # Mask R-CNN: P6 has stride 64


def input_multiple(name, model_config=None):
    """Spatial sizes of family ``name`` (with ``model_config``) must be multiples of this."""
    if name in FIXED_MULTIPLES:
        return FIXED_MULTIPLES[name]
    depth = (model_config or {}).get("depth")
    if depth is None:
        from kerasnuc import models

        try:
            depth = models.default_config(name).get("depth", 0)
        except ValueError:  # an unknown family: its run says what it is
            depth = 0
    return 2 ** int(depth or 0)
