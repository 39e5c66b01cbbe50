"""The prediction engine: any model (run folder, .tflite, TF-Serving) -> maps, points, nuclei.

>>> import kerasnuc
>>> predictor = kerasnuc.load("runs/unet-20261125")
>>> labels, table = predictor.predict_instances(image)

Modules: ``engine`` (the Predictor: tiling, Monte-Carlo passes, blocks), ``runtimes``
(Keras, gRPC), ``litert`` (LiteRT), ``tiling``, ``postprocess``, ``measure`` (the nucleus
table), ``writers`` (labels, QuPath GeoJSON, CSV, overlay), ``slides`` (whole-slide input)
and the command line (``python -m kerasnuc.predict``). Importing it needs no TensorFlow,
Keras or JAX.
"""

from kerasnuc.predict.engine import Predictor, load

__all__ = ["Predictor", "load"]
