"""Bounded memory of block-wise prediction: a block's pixels, maps and labels are freed once
its consumer lets go of it, not held until the image ends (a 32k slide has 256 blocks)."""

import gc
import weakref

import numpy as np

from kerasnuc.predict.engine import Predictor


class DiskRuntime:
    """A stand-in network: a bright disk per 32 x 32 cell is a nucleus (no TensorFlow needed)."""

    meta = {"task": "segmentation", "channels": 1, "multiple": 1, "receptive_radius": 0,
            "postprocess": {"threshold": 0.5, "min_distance": 3}}

    def run(self, batch):
        return (np.asarray(batch, np.float32)[..., :1] > 0.5).astype(np.float32)


def test_finished_blocks_are_freed_while_the_image_streams():
    image = np.zeros((512, 512), np.uint8)
    rows, cols = np.indices((512, 512))
    image[(rows % 32 - 16) ** 2 + (cols % 32 - 16) ** 2 < 36] = 255
    predictor = Predictor(DiskRuntime(), block=64, block_overlap=16)
    alive, seen, nuclei = [], 0, 0
    for result in predictor.stream([image]):
        assert result.error is None, result.error
        seen += 1
        nuclei += len(result.table["id"])
        alive.append(weakref.ref(result))
        del result
        gc.collect()
        held = sum(ref() is not None for ref in alive)
        assert held <= 4, f"{held} of {seen} finished blocks still in memory"  # the prefetch depth, not all
    assert seen == 64 and nuclei == 16 * 16  # every block ran, every disk found once
