"""Serving exported models.

* :mod:`serving.server`: an embedded gRPC server speaking TensorFlow Serving's API
  (PredictionService Predict / GetModelMetadata, ModelService GetModelStatus) for an
  export base written by ``export.saved_model``; ``python -m serving.server --base BASE``.
* :mod:`serving.client`: tiles images, sends them to TF-Serving or the embedded server,
  stitches and post-processes into nuclei; ``python -m serving.client --target ... IMAGE``.
* :mod:`serving.edge`: runs a ``.tflite`` with LiteRT, without TensorFlow.
* :mod:`kerasnuc.predict.tiling`: NumPy tiling/stitching/normalisation shared by client and edge.

Importing this package imports nothing heavy (edge must run without TensorFlow).
"""
