"""The input pipeline feeds Keras-on-JAX training in a process where TensorFlow cannot be imported.

That is the GPU machine's situation (see PLATFORM.md: JAX, no TensorFlow). The check runs in a
subprocess with ``KERAS_BACKEND=jax`` and an import hook that makes ``import tensorflow`` fail.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DSB_TEST = os.path.join(REPO, "..", "shared", "data", "dsb2018", "stage1_test")

SCRIPT = textwrap.dedent(r'''
    import importlib.abc, json, os, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                raise ImportError(f"TensorFlow is blocked in this process ({name})")
            return None

    sys.meta_path.insert(0, NoTensorFlow())

    import numpy as np
    from kerasnuc.data import load_dataset
    from kerasnuc.data.augment import Augmenter
    from kerasnuc.data.pipeline import ClassificationDataset, DetectionDataset, SegmentationDataset
    from kerasnuc.data.targets import instance_centroids
    import keras

    records = load_dataset("sample")[:4]
    dsb = sys.argv[1]
    if os.path.isdir(dsb):
        records += load_dataset("dsb2018:" + dsb)[:2]
    for record in records:  # made-up classes (nucleus size) for the classifier
        record.points, ids = instance_centroids(record.labels)
        record.classes = np.digitize(np.bincount(record.labels.ravel())[ids], [60, 200])
    augmenter = Augmenter(rotate=30, elastic=3)
    segmentation = SegmentationDataset(records, tile=32, batch_size=4, steps=2, target="three_class",
                                       augmenter=augmenter, seed=0)
    detection = DetectionDataset(records, tile=32, batch_size=4, steps=2, sigma=2.0, augmenter=augmenter,
                                 seed=0, workers=2)
    classification = ClassificationDataset(records, patch=16, batch_size=8, steps=2, balanced=True, seed=0)
    shapes = {name: [list(a.shape) + [str(a.dtype)] for a in data[0]]
              for name, data in (("segmentation", segmentation), ("detection", detection),
                                 ("classification", classification))}

    def conv_model(outputs, activation):
        return keras.Sequential([keras.Input((None, None, 3)),
                                 keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
                                 keras.layers.Conv2D(outputs, 1, activation=activation)])

    losses = {}
    model = conv_model(3, "softmax")
    model.compile("adam", "categorical_crossentropy")
    losses["segmentation"] = model.fit(segmentation, epochs=1, verbose=0).history["loss"]
    model = conv_model(1, None)
    model.compile("adam", "mse")
    losses["detection"] = model.fit(detection, epochs=1, verbose=0).history["loss"]
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    losses["classification"] = model.fit(classification, epochs=1, verbose=0).history["loss"]

    print(json.dumps({"backend": keras.backend.backend(), "records": len(records), "shapes": shapes,
                      "losses": losses, "tensorflow_loaded": sorted(m for m in sys.modules
                                                                    if m.split(".")[0] == "tensorflow")}))
''')


def test_pipeline_trains_on_jax_without_tensorflow():
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install 'jax[cpu]'); the JAX/no-TensorFlow check needs it")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", SCRIPT, DSB_TEST], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == "jax"
    assert report["tensorflow_loaded"] == []
    assert report["shapes"] == {
        "segmentation": [[4, 32, 32, 3, "float32"], [4, 32, 32, 3, "float32"]],
        "detection": [[4, 32, 32, 3, "float32"], [4, 32, 32, 1, "float32"]],
        "classification": [[8, 16, 16, 3, "float32"], [8, "int32"]],
    }
    for name, history in report["losses"].items():
        assert len(history) == 1 and history[0] == history[0] and history[0] < 1e3, (name, history)
