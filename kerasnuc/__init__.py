"""kerasnuc: find, outline and classify cell nuclei with Keras 3.

Packages follow the pipeline: ``data`` (readers, targets, augmentation, stain) ->
``models`` -> ``postprocess`` (instances, peaks, test-time augmentation) -> ``metrics``.
Training, export and serving live in the top-level ``training``, ``export`` and
``serving`` packages.
"""

__version__ = "0.1.0"
