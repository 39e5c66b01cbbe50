"""Deployment files for TensorFlow Serving, written into an export base by ``export.saved_model``.

An export base looks like ``BASE/<model>/<version>/saved_model.pb``; next to the models
go ``models.config`` (one entry per model), ``batching_parameters.txt`` and a
``compose.yaml`` that runs the official ``tensorflow/serving`` image on BASE::

    cd BASE && docker compose up      # gRPC on :8500, REST on :8501

The image tag defaults to ``latest``; pin one with ``TF_SERVING_IMAGE=tensorflow/serving:<tag>``.
"""

import os
from string import Template

from kerasnuc.atomic import write_text_atomic

MODELS_CONFIG_ENTRY = Template("""\
  config {
    name: "$name"
    base_path: "$mount/$name"
    model_platform: "tensorflow"
    model_version_policy { latest { num_versions: 1 } }
  }
""")

MODELS_CONFIG = Template("""\
# TensorFlow Serving model config, written by kerasnuc export.saved_model.
# Each model serves its newest integer version folder; folders with other names
# (the exporter's hidden .incomplete-* staging folders) are never loaded.
model_config_list {
$entries}
""")

BATCHING_PARAMETERS = """\
# TensorFlow Serving batching (--enable_batching). Requests are merged along the batch
# dimension only when their other dimensions agree: send fixed-size tiles (serving.client
# does) so they batch; whole images of different sizes are simply run one by one.
max_batch_size { value: 16 }
batch_timeout_micros { value: 5000 }
max_enqueued_batches { value: 64 }
num_batch_threads { value: 4 }
pad_variable_length_inputs: false
"""

COMPOSE = Template("""\
# Serves every model in this export base with the official TensorFlow Serving image.
#   docker compose up        (from this folder)
#   gRPC: localhost:8500   REST: http://localhost:8501/v1/models/<model>
# New version folders are picked up automatically (--file_system_poll_wait_seconds).
services:
  tfserving:
    image: $${TF_SERVING_IMAGE:-tensorflow/serving:latest}
    entrypoint: ["tensorflow_model_server"]
    command:
      - --port=8500
      - --rest_api_port=8501
      - --model_config_file=$mount/models.config
      - --model_config_file_poll_wait_seconds=60
      - --file_system_poll_wait_seconds=5
      - --enable_batching=true
      - --batching_parameters_file=$mount/batching_parameters.txt
    ports:
      - "8500:8500"
      - "8501:8501"
    volumes:
      - ./:$mount:ro
    restart: unless-stopped
""")

MOUNT = "/models"


def model_names(base):
    """Models in an export base: sub-folders holding at least one integer version folder."""
    names = []
    for entry in sorted(os.listdir(base)):
        folder = os.path.join(base, entry)
        if os.path.isdir(folder) and not entry.startswith(".") and any(
                v.isdigit() and os.path.isdir(os.path.join(folder, v)) for v in os.listdir(folder)):
            names.append(entry)
    return names


def write_deploy_files(base, mount=MOUNT):
    """(Re)write models.config, batching_parameters.txt and compose.yaml in ``base``; returns their paths."""
    entries = "".join(MODELS_CONFIG_ENTRY.substitute(name=name, mount=mount) for name in model_names(base))
    files = {
        "models.config": MODELS_CONFIG.substitute(entries=entries),
        "batching_parameters.txt": BATCHING_PARAMETERS,
        "compose.yaml": COMPOSE.substitute(mount=mount),
    }
    paths = []
    for name, text in files.items():
        path = os.path.join(base, name)
        write_text_atomic(path, text)
        paths.append(path)
    return paths
