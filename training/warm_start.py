"""Start training from a trained model's weights (fine-tuning): ``"init_weights"`` in the config.

The source is a pretrained name (``kerasnuc.pretrained.available()``), a run folder or a
``.keras`` file. Its architecture must be the one being trained, weight for weight; otherwise
the error names the source and the first weight that differs, before any epoch runs. Only the
model's variables are copied: the optimizer starts fresh, as fine-tuning expects.
"""

import os


def source_file(spec):
    """The ``.keras`` file ``spec`` names (a pretrained name, a run folder or the file itself)."""
    from kerasnuc import pretrained

    try:
        path = os.fspath(pretrained.resolve(spec))
    except FileNotFoundError as error:
        raise ValueError(f"init_weights: {error}") from None
    if not os.path.exists(path):
        raise ValueError(f"init_weights {spec}: {path} not found")
    if os.path.isdir(path):
        path = os.path.join(path, "model.keras")
        if not os.path.isfile(path):
            raise ValueError(f"init_weights {spec}: {path} not found (not a run folder)")
    if not path.endswith(".keras"):
        raise ValueError(f"init_weights {spec}: needs a Keras model (a run folder, a .keras file or a "
                         f"pretrained name), got {path}")
    return path


def load_initial_weights(model, spec, log=print):
    """Copy the weights of ``spec`` into ``model`` (shapes checked one by one); returns the file."""
    from kerasnuc.runs import RunError, read_keras_file

    path = source_file(spec)
    try:
        source = read_keras_file(path)
    except RunError as error:
        raise ValueError(f"init_weights: {error}") from None
    mine, theirs = model.weights, source.weights
    if len(mine) != len(theirs):
        raise ValueError(f"init_weights {path}: {len(theirs)} weights, the model being trained has {len(mine)} "
                         "(a different model or model_config)")
    for index, (target, value) in enumerate(zip(mine, theirs)):
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"init_weights {path}: weight {index} ({value.path}) has shape {tuple(value.shape)}, "
                             f"the model being trained needs {tuple(target.shape)} ({target.path})")
    model.set_weights(source.get_weights())
    log(f"initial weights from {path} ({source.count_params():,} parameters)")
    return path
