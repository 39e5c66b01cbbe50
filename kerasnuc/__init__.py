"""kerasnuc: find, outline and classify cell nuclei with Keras 3.

Packages follow the pipeline: ``data`` (readers, targets, augmentation, stain) ->
``models`` -> ``predict`` (one engine from any model to nuclei) -> ``postprocess`` (instances, peaks, test-time augmentation) -> ``metrics``.
Training, export and serving live in the top-level ``training``, ``export`` and
``serving`` packages.
"""

__version__ = "0.1.0"


def load(source, **options):
    """A :class:`kerasnuc.predict.Predictor` for a run folder, a ``.tflite`` export or a
    TF-Serving ``host:port`` (``model_name=...``): ``kerasnuc.load(run).predict_instances(image)``."""
    from kerasnuc.predict import load as load_predictor

    return load_predictor(source, **options)
