"""Data: readers for the field's datasets, training targets, augmentation, input pipeline, stain.

Every reader returns a list of :class:`~kerasnuc.data.types.NucleiImage`; a dataset
*spec* such as ``sample``, ``dsb2018:PATH`` or ``folder:PATH`` names a reader and a
path (see :func:`kerasnuc.data.spec.load_dataset`).
"""

from kerasnuc.data.spec import available_formats, load_dataset
from kerasnuc.data.types import NucleiImage

__all__ = ["NucleiImage", "available_formats", "load_dataset"]
