"""Strict structure check of a JPEG stream, because libjpeg decodes damaged files silently.

JPEG has no checksum: a stray end-of-image marker inside the compressed data, lost restart
intervals or a cut-off file are decoded by Pillow, OpenCV and imagecodecs alike into an image
with grey or smeared blocks, and at most a warning on stderr. This walks the marker structure
(segment lengths, every scan's entropy-coded data up to its terminating marker, restart markers
in sequence and, with a restart interval, as many of them as the frame's MCUs need) and requires
the stream to end with its end-of-image marker, followed by nothing but padding or another
embedded JPEG (MPO). What it cannot see: flipped bits inside the entropy-coded data, which decode
to wrong pixels without breaking the structure (no JPEG reader can tell).
"""

import math

_STANDALONE = {0x01} | set(range(0xD0, 0xD8))  # TEM, RST0..7: no length field
_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (DHT, JPG, DAC excluded)


class JpegStructureError(ValueError):
    """The stream's marker structure is broken (the message says where and how)."""


def check_jpeg_stream(data):
    """Raise :class:`JpegStructureError` unless ``data`` (bytes) is a structurally complete JPEG."""
    data = memoryview(data)
    size = len(data)
    if size < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise JpegStructureError("no start-of-image marker")
    pos, frame, interval = 2, None, 0
    while True:
        pos, marker = _next_marker(data, pos)
        if marker is None:
            raise JpegStructureError(f"ends at byte {size} without an end-of-image marker (truncated)")
        if marker == 0xD9:
            _check_trailer(data, pos)
            return
        if marker in _STANDALONE:
            continue
        if pos + 2 > size:
            raise JpegStructureError(f"segment 0xFF{marker:02X} cut off at byte {size} (truncated)")
        length = (data[pos] << 8) | data[pos + 1]
        if length < 2 or pos + length > size:
            raise JpegStructureError(f"segment 0xFF{marker:02X} at byte {pos - 2} claims {length} bytes, "
                                     f"{size - pos} left (truncated or corrupt)")
        segment = data[pos + 2:pos + length]
        pos += length
        if marker in _SOF:
            frame = _frame(segment)
        elif marker == 0xDD and len(segment) >= 2:  # DRI: restart interval in MCUs
            interval = (segment[0] << 8) | segment[1]
        elif marker == 0xDA:
            if frame is None:
                raise JpegStructureError("a scan before any frame header (corrupt)")
            start = pos
            pos, restarts = _scan(data, pos)
            expected = _expected_restarts(frame, segment, interval)
            if expected is not None and restarts != expected:
                raise JpegStructureError(f"the scan at byte {start} has {restarts} restart markers where its "
                                         f"{interval}-MCU restart interval needs {expected} (data lost or corrupt)")


def _next_marker(data, pos):
    """(position after the marker, marker byte) of the next marker at ``pos`` (fill bytes skipped);
    (pos, None) at the end of the data. Anything but a marker here is corruption."""
    size = len(data)
    if pos >= size:
        return pos, None
    if data[pos] != 0xFF:
        raise JpegStructureError(f"byte {pos}: expected a marker, found 0x{data[pos]:02X} (corrupt)")
    while pos < size and data[pos] == 0xFF:
        pos += 1
    if pos >= size:
        return pos, None
    return pos + 1, data[pos]


def _scan(data, pos):
    """Walk entropy-coded data from ``pos`` to the marker that ends it: (its position, number of
    restart markers seen). Restart markers must come in order RST0, RST1, ... modulo 8."""
    size, restarts = len(data), 0
    raw = bytes(data[pos:])
    offset = 0
    while True:
        hit = raw.find(b"\xff", offset)
        if hit < 0 or hit + 1 >= len(raw):
            return size, restarts  # no terminating marker: the caller reports the truncation
        following = raw[hit + 1]
        if following == 0x00 or following == 0xFF:  # stuffed byte, or fill before a marker
            offset = hit + 1 if following == 0xFF else hit + 2
            continue
        if 0xD0 <= following <= 0xD7:
            if following - 0xD0 != restarts % 8:
                raise JpegStructureError(f"byte {pos + hit}: restart marker RST{following - 0xD0} where "
                                         f"RST{restarts % 8} was due (data lost or corrupt)")
            restarts += 1
            offset = hit + 2
            continue
        return pos + hit, restarts


def _frame(segment):
    """{component id: (h, v)}, height, width of a frame header."""
    if len(segment) < 6:
        raise JpegStructureError("frame header too short (corrupt)")
    height, width, count = (segment[1] << 8) | segment[2], (segment[3] << 8) | segment[4], segment[5]
    if len(segment) < 6 + 3 * count:
        raise JpegStructureError("frame header too short for its components (corrupt)")
    sampling = {segment[6 + 3 * i]: (segment[7 + 3 * i] >> 4, segment[7 + 3 * i] & 15) for i in range(count)}
    return {"height": height, "width": width, "sampling": sampling}


def _expected_restarts(frame, scan_header, interval):
    """Restart markers a scan must hold with a restart interval, or None where it cannot be said
    (no interval, a height given later by DNL, an unknown component)."""
    if not interval or not frame["height"] or not scan_header:
        return None
    ids = [scan_header[1 + 2 * i] for i in range(scan_header[0])]
    if any(i not in frame["sampling"] for i in ids):
        return None
    hmax = max(h for h, _ in frame["sampling"].values())
    vmax = max(v for _, v in frame["sampling"].values())
    if len(ids) == 1:  # non-interleaved: one component's own blocks
        h, v = frame["sampling"][ids[0]]
        mcus = math.ceil(math.ceil(frame["width"] * h / hmax) / 8) * math.ceil(math.ceil(frame["height"] * v / vmax) / 8)
    else:
        mcus = math.ceil(frame["width"] / (8 * hmax)) * math.ceil(frame["height"] / (8 * vmax))
    return max(math.ceil(mcus / interval) - 1, 0)


def _check_trailer(data, pos):
    """After end-of-image: nothing, zero/0xFF padding, or another JPEG (an MPO's next image)."""
    rest = bytes(data[pos:])
    if not rest.strip(b"\x00\xff") or rest.startswith(b"\xff\xd8"):
        return
    raise JpegStructureError(f"{len(rest)} bytes of data after the end-of-image marker at byte {pos - 2} "
                             "(a marker inside the compressed data cut the image short: corrupt)")
