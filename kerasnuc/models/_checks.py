"""Argument checks shared by the builders: fail early with a message that says what to change."""


def check_input_shape(input_shape, depth, family):
    """Require (H, W, C) with H, W None or divisible by 2**depth, and C in (1, 3)."""
    if len(input_shape) != 3:
        raise ValueError(f"{family}: input_shape must be (height, width, channels), got {input_shape}")
    height, width, channels = input_shape
    if channels not in (1, 3):
        raise ValueError(f"{family}: channels must be 1 (grey) or 3 (RGB), got {channels}")
    factor = 2 ** depth
    for axis, size in (("height", height), ("width", width)):
        if size is not None and size % factor:
            raise ValueError(
                f"{family}: {axis} {size} is not divisible by 2**depth = {factor}; "
                f"pad or crop the input, or use a smaller depth")
    return tuple(input_shape)


def head_activation(out_channels, activation):
    """Default activation: sigmoid for one channel, softmax for several."""
    if activation != "auto":
        return activation
    return "sigmoid" if out_channels == 1 else "softmax"
