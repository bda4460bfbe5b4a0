"""What an image's header says, read from bytes without decoding a pixel (microseconds, no large allocation)."""
from __future__ import annotations

import struct

JPEG_SOI = b"\xff\xd8\xff"
ORIENTATION_TAG = 0x0112


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_SOI


def jpeg_header(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, colour space) from a JPEG's frame header (libjpeg-turbo), or None if it cannot tell."""
    import simplejpeg

    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return w, h, colorspace


def jpeg_orientation(data: bytes) -> int | None:
    """The EXIF orientation tag (1..8) of a JPEG, from its APP1 segment; None when there is none.

    Only the application segments at the start of the file are walked (EXIF lives there), not the whole header.
    """
    pos = 2
    n = len(data)
    while pos + 4 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        if not 0xE0 <= marker <= 0xEF:  # tables, frame or scan: the metadata segments are behind us
            return None
        length = struct.unpack_from(">H", data, pos + 2)[0]
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\0\0":
            return tiff_orientation(data[pos + 10:pos + 2 + length])
        pos += 2 + length
    return None


def tiff_orientation(tiff: bytes) -> int | None:
    """Orientation from a TIFF-structured EXIF block (IFD0), or None."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    e = "<" if tiff[:2] == b"II" else ">"
    try:
        ifd = struct.unpack_from(e + "I", tiff, 4)[0]
        count = struct.unpack_from(e + "H", tiff, ifd)[0]
        for i in range(count):
            tag, typ, _, value = struct.unpack_from(e + "HHI4s", tiff, ifd + 2 + 12 * i)
            if tag == ORIENTATION_TAG and typ == 3:  # SHORT, stored left-justified in the value field
                o = struct.unpack_from(e + "H", value)[0]
                return o if 1 <= o <= 8 else None
    except struct.error:
        return None
    return None
