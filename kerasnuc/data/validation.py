"""The one policy for untrusted input files: pixel limit, bit depth, binary labels, skipping.

Every image and label that kerasnuc reads whole into memory goes through
:mod:`kerasnuc.data.imageio`, which applies an :class:`InputPolicy`:

* ``max_pixels``: images larger than this (height x width, read from the file header before
  anything is decoded) are refused, so a small hostile file cannot claim gigabytes. Default
  ``2**28`` (268 MP, e.g. 16384 x 16384). Whole slides read lazily block by block
  (:func:`kerasnuc.predict.sources.open_slide`) are not subject to it.
* ``bit_depth``: how images stored in more than 8 bits are brought to 8 bits. ``"auto"``
  (default) takes each image's real range: the smallest of 8, 10, 12, 14 or 16 bits that
  holds its maximum (more bits only for 32-bit data beyond 16), so 12-bit data stored as
  16-bit is scaled by 255 / 4095, not by 255 / 65535. An integer states the depth for every
  image (a value above it is an error). 8-bit files are used as they are.
* ``binary_labels``: an instance label image that is really a binary mask (only the values
  0 and 1, 0 and 255 or 0 and 65535, with several separate 8-connected blobs under the one
  id) is an error by default; ``"components"`` numbers its blobs 1..N instead
  (:func:`skimage.measure.label`, 8-connectivity), so touching nuclei stay merged.

Readers take ``policy=`` and ``skipped=``: with a ``skipped`` list a bad input is recorded
there (name, file, reason) and left out instead of stopping the whole read (``--skip-bad``).
"""

import os
import warnings
from dataclasses import dataclass

import numpy as np

DEFAULT_MAX_PIXELS = 2 ** 28
AUTO_BIT_DEPTHS = (8, 10, 12, 14, 16)
BINARY_LABELS = ("error", "components")
_BINARY_IDS = (1, 255, 65535)


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


class DataWarning(UserWarning):
    """Input that was read with parts left out (e.g. annotation regions that cannot be drawn)."""


def parse_bit_depth(value):
    """'auto' or a whole number of bits 1..32 (also the argparse type of ``--bit-depth``)."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"bit depth must be 'auto' or a number of bits, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= int(value) <= 32:
        raise ValueError(f"bit depth must be 'auto' or a number of bits from 1 to 32, got {value!r}")
    return int(value)


def parse_max_pixels(value):
    """A positive whole number of pixels; accepts '268435456', '2**28', '256M' (also the argparse type)."""
    text = str(value).strip().upper().replace("_", "")
    try:
        if "**" in text:
            base, exponent = text.split("**", 1)
            number = int(base) ** int(exponent)
        elif text.endswith(("K", "M", "G")):
            number = int(float(text[:-1]) * {"K": 1e3, "M": 1e6, "G": 1e9}[text[-1]])
        else:
            number = int(float(text))
    except (ValueError, OverflowError):
        raise ValueError(f"max pixels must be a positive number of pixels, got {value!r}") from None
    if number < 1:
        raise ValueError(f"max pixels must be a positive number of pixels, got {value!r}")
    return number


@dataclass(frozen=True)
class InputPolicy:
    """What may be read and how (see the module docstring); invalid settings raise ValueError."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    bit_depth: object = "auto"
    binary_labels: str = "error"

    def __post_init__(self):
        object.__setattr__(self, "max_pixels", parse_max_pixels(self.max_pixels))
        object.__setattr__(self, "bit_depth", parse_bit_depth(self.bit_depth))
        if self.binary_labels not in BINARY_LABELS:
            raise ValueError(f"binary_labels must be one of {BINARY_LABELS}, got {self.binary_labels!r}")

    @classmethod
    def from_options(cls, max_pixels=None, bit_depth=None, binary_labels=None):
        """A policy from optional settings (None: the default), e.g. from a run's config."""
        return cls().override(max_pixels=max_pixels, bit_depth=bit_depth, binary_labels=binary_labels)

    def override(self, **given):
        """This policy with the settings given replaced (None: keep this one's)."""
        return InputPolicy(**{**self.to_dict(), **{key: value for key, value in given.items() if value is not None}})

    def to_dict(self):
        return {"max_pixels": self.max_pixels, "bit_depth": self.bit_depth, "binary_labels": self.binary_labels}

    def check_pixels(self, path, shape):
        """Refuse an image of ``shape`` (its dimensions without channels) above the limit, before decoding."""
        pixels = int(np.prod([int(s) for s in shape], dtype=object))
        if pixels > self.max_pixels:
            size = " x ".join(str(int(s)) for s in shape)
            raise DataError(f"{path}: {size} = {_megapixels(pixels)} exceeds the {_megapixels(self.max_pixels)} "
                            f"pixel limit; raise it with --max-pixels")


DEFAULT = InputPolicy()


def _megapixels(pixels):
    return f"{pixels / 1e6:.0f} MP" if pixels >= 1e7 else f"{pixels / 1e6:.3g} MP"


def resolve_policy(policy):
    """``policy`` or the default one."""
    if policy is None:
        return DEFAULT
    if not isinstance(policy, InputPolicy):
        raise TypeError(f"policy must be an InputPolicy, got {type(policy).__name__}")
    return policy


# ---------------------------------------------------------------------------- bit depth

def data_bits(top):
    """The 'auto' bit depth of an image whose maximum is ``top``: the smallest of 8/10/12/14/16 bits
    that holds it (its bit length beyond 16)."""
    top = int(top)
    return next((bits for bits in AUTO_BIT_DEPTHS if top < 2 ** bits), max(top.bit_length(), 16))


def scale_to_uint8(array, path, policy=None):
    """uint8 pixels of an image stored in more bits, scaled by its real or stated range (never by the
    container's maximum). Floats: [0, 1] data times 255, otherwise as 0..max(255, maximum)."""
    policy = resolve_policy(policy)
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.integer):
        if array.size == 0:
            return array.astype(np.uint8)
        low, top = int(array.min()), int(array.max())
        if low < 0:
            raise DataError(f"{path}: negative pixel values (minimum {low}); expected unsigned intensities")
        bits = data_bits(top) if policy.bit_depth == "auto" else policy.bit_depth
        if top >= 2 ** bits:
            raise DataError(f"{path}: values up to {top} do not fit the stated {bits}-bit depth "
                            f"(maximum {2 ** bits - 1}); check --bit-depth")
        scale = 255.0 / (2 ** bits - 1)
    elif np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            raise DataError(f"{path}: {int((~finite).sum())} pixels are NaN or infinite")
        top = float(array.max()) if array.size else 0.0
        scale = 255.0 if 0.0 < top <= 1.0 else 255.0 / max(top, 255.0)
    else:
        raise DataError(f"{path}: unsupported pixel type {array.dtype}")
    return np.clip(array.astype(np.float64) * scale, 0, 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------- labels

# One id over this many separate blobs is a class or binary map, not a nucleus: the real sets
# have at most 3 (MoNuSeg, 27 of 16959 ids split by annotation; DSB 2018 at most 2).
MANY_BLOBS = 5


def check_instance_labels(labels, path, policy=None):
    """Instance labels as they are, or, for a binary mask with several blobs or any id spread
    over MANY_BLOBS or more separate blobs (a class map), an error naming the file (default) or
    its blobs numbered 1..N as nuclei (``binary_labels="components"``)."""
    from skimage.measure import label

    policy = resolve_policy(policy)
    top = int(labels.max()) if labels.size else 0
    if top == 0:
        return labels
    # connected regions of one value each: a nucleus is one (rarely 2-3) of them
    components, count = label(labels, background=0, connectivity=2, return_num=True)
    id_of = np.zeros(count + 1, np.int64)
    id_of[components.ravel()] = labels.ravel()
    blobs = np.bincount(id_of[1:], minlength=top + 1)
    binary = top in _BINARY_IDS and np.count_nonzero(blobs) == 1 and count >= 2
    spread = np.nonzero(blobs >= MANY_BLOBS)[0]
    if not binary and not len(spread):
        return labels
    if policy.binary_labels == "components":
        return components.astype(np.int32)
    if binary:
        raise DataError(f"{path}: looks like a binary mask, not instance labels ({count} separate blobs all with "
                        f"id {top}); number the blobs as nuclei with --binary-labels components")
    worst = int(spread[np.argmax(blobs[spread])])
    raise DataError(f"{path}: looks like a class map, not instance labels (id {worst} covers {int(blobs[worst])} "
                    f"separate blobs; {len(spread)} ids cover {MANY_BLOBS} or more); number the blobs as nuclei "
                    "with --binary-labels components")


# ---------------------------------------------------------------------------- skipping bad inputs

def read_or_skip(skipped, name, path, read):
    """``read()``, or with a ``skipped`` list: None after noting {name, file, error} of a DataError
    there, so one bad input does not stop the others (``--skip-bad``)."""
    if skipped is None:
        return read()
    try:
        return read()
    except DataError as error:
        skipped.append({"name": str(name), "file": os.fspath(path), "error": str(error)})
        return None


def warn(message):
    """One DataWarning (read with parts left out), attributed to the caller of the reader."""
    warnings.warn(message, DataWarning, stacklevel=3)


# ---------------------------------------------------------------------------- command lines

def add_arguments(parser, labels=True, skip_bad=False, default_note=""):
    """The input-policy flags of a command line (defaults None: 'not given')."""
    group = parser.add_argument_group("bad input")
    group.add_argument("--max-pixels", type=parse_max_pixels, dest="max_pixels", metavar="N",
                       help=f"refuse images larger than N pixels (height x width, read from the header before "
                            f"decoding; e.g. 2**30 or 1G; default {DEFAULT_MAX_PIXELS} = 2**28{default_note}); "
                            f"lazily read slides are not limited")
    group.add_argument("--bit-depth", type=parse_bit_depth, dest="bit_depth", metavar="auto|BITS",
                       help="bits of the data in images stored in more than 8 bits: 'auto' (default"
                            f"{default_note}: the smallest of 8/10/12/14/16 that holds each image's maximum) or "
                            "a number such as 12; scaled to 8 bits by that range")
    if labels:
        group.add_argument("--binary-labels", choices=BINARY_LABELS, dest="binary_labels", default=None,
                           help="a label image that is a binary mask with several blobs: 'error' (default"
                                f"{default_note}) or 'components' (number its 8-connected blobs as nuclei)")
    if skip_bad:
        group.add_argument("--skip-bad", action="store_true", dest="skip_bad",
                           help="skip unreadable or invalid inputs and list them (file and reason) in the "
                                "report; default: stop with an error naming the file")
    return group


def policy_overrides(args):
    """{setting: value} of the ``add_arguments`` flags given on a command line (not given: None)."""
    return {key: getattr(args, key, None) for key in DEFAULT.to_dict()}


def policy_from_args(args, fallback=None):
    """The policy of parsed ``add_arguments`` flags; flags not given take ``fallback``'s values."""
    return (fallback or DEFAULT).override(**policy_overrides(args))
