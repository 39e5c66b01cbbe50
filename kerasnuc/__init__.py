"""kerasnuc: find, outline and classify cell nuclei with Keras 3.

Packages follow the pipeline: ``data`` (readers, targets, augmentation, stain) ->
``models`` -> ``predict`` (one engine from any model to nuclei) -> ``postprocess`` (instances, peaks, test-time augmentation) -> ``metrics``.
Training, export and serving live in the top-level ``training``, ``export`` and
``serving`` packages.
"""

__version__ = "0.1.0"

from kerasnuc import pretrained  # noqa: E402  (the shipped models by name; imports no framework)

__all__ = ["__version__", "load", "pretrained"]


def load(source, **options):
    """A :class:`kerasnuc.predict.Predictor` for a run folder, a ``.tflite`` export, a
    TF-Serving ``host:port`` (``model_name=...``) or a pretrained model's name
    (:func:`kerasnuc.pretrained.available`): ``kerasnuc.load("he").predict_instances(image)``."""
    from kerasnuc.predict import load as load_predictor

    return load_predictor(source, **options)
