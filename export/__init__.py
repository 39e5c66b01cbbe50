"""Export trained runs for deployment.

* :mod:`export.saved_model`: TF-Serving SavedModel (uint8 input, in-graph normalisation,
  atomic versions, deployment files); ``python -m export.saved_model RUN --base BASE``.
* :mod:`export.tflite`: LiteRT flatbuffers in float32 / float16 / dynamic-range / int8,
  each with a metadata JSON and an agreement/latency report; ``python -m export.tflite RUN``.
* :mod:`export.pretrained`: a finished run packed as a model shipped in the package
  (``kerasnuc/pretrained/NAME``: slim run, int8 .tflite, model card);
  ``python -m export.pretrained RUN --name NAME --config configs/pretrained/NAME.json``.
* :mod:`kerasnuc.runs`: the run facts every export carries (task, channels, classes,
  tile, thresholds, versions).

Importing this package imports neither TensorFlow nor Keras.
"""
