"""PNG files checked before libpng reads their pixels.

torchvision's PNG decoder crashes the process (a segmentation fault, no exception) when libpng
finds an error while it reads the pixel rows: a chunk whose CRC fails, pixel data that does not
inflate, a row with an unknown filter. One damaged file in a dataset would kill every actor
that tries it, and the run with them. So PNG files of 8 bits or fewer per sample are decoded by
PIL, whose errors are exceptions (the pixels are the same to the bit), and 16-bit files, which
PIL would read otherwise, and files over PIL's own size limit go to torchvision only once
:func:`damage` finds nothing libpng could fail on.

>>> import struct, zlib
>>> def chunk(kind, body):
...     return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
>>> ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0))  # 2x1, 16-bit RGB
>>> png = MAGIC + ihdr + chunk(b"IDAT", zlib.compress(b"\\0" + bytes(12))) + chunk(b"IEND", b"")
>>> sixteen_bit(png), damage(png)
(True, None)
>>> damage(png.replace(b"IDAT", b"IDAX", 1))  # a chunk's type changed: its CRC fails
'the IDAX chunk at byte 33 fails its CRC check'
>>> damage(MAGIC + ihdr + chunk(b"IDAT", zlib.compress(b"\\7" + bytes(12))) + chunk(b"IEND", b""))
'row 0 of its pixels has filter type 7 (0 to 4 are valid)'
>>> half = zlib.compress(b"\\0" + bytes(12))
>>> damage(MAGIC + ihdr + chunk(b"IDAT", half[:5]) + chunk(b"tEXt", b"a\\0b") + chunk(b"IDAT", half[5:]))
'its IDAT chunks are not one after another (another chunk before byte 65)'
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

MAGIC = b"\x89PNG\r\n\x1a\n"

#: The critical chunks libpng knows; another stops it.
_CRITICAL = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND"})

#: Samples per pixel of each PNG colour type (grey, RGB, palette, grey + alpha, RGBA).
_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}

#: Adam7's passes: the first column and row of each, and its steps across and down.
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def sixteen_bit(data: bytes) -> bool:
    """Whether the PNG file ``data`` holds 16 bits per sample: PIL reads colour ones as 8 bits,
    and grey ones as one channel where torchvision gives three (a grey model's luma of them
    differs in the last bit)."""
    return len(data) >= 26 and data[12:16] == b"IHDR" and data[24] == 16


def damage(data: bytes) -> str | None:
    """Why libpng would fail on the PNG file ``data`` once it reads its pixels, in words; None
    when nothing would (its header's own faults libpng reports safely, and they are left to it)."""
    position, header, pixels, previous = len(MAGIC), None, [], b""
    while position + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        end = position + 12 + length
        name = kind.decode("latin-1")
        if end > len(data):
            return f"the {name} chunk at byte {position} runs past the end of the file"
        critical = not kind[0] & 0x20  # (libpng passes over an ancillary chunk whose CRC fails)
        if critical and zlib.crc32(data[position + 4:end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            return f"the {name} chunk at byte {position} fails its CRC check"
        if critical and kind not in _CRITICAL:
            return f"it holds a critical chunk libpng does not know ({name}, at byte {position})"
        if pixels and kind in (b"IHDR", b"PLTE"):
            return f"it holds a {name} chunk after its pixel data (at byte {position})"
        if kind == b"IHDR" and length >= 13:
            header = struct.unpack_from(">IIBBBBB", data, position + 8)
        elif kind == b"IDAT":
            if pixels and previous != b"IDAT":  # libpng reads one unbroken run of them
                return f"its IDAT chunks are not one after another (another chunk before byte {position})"
            pixels.append(data[position + 8:end - 4])
        elif kind == b"IEND":
            break
        position, previous = end, kind
    if header is None:
        return "it has no IHDR chunk"
    if not pixels:
        return "it has no IDAT chunk (no pixel data)"
    try:
        raw = zlib.decompress(b"".join(pixels))
    except zlib.error as exc:
        return f"its pixel data does not inflate ({exc})"
    return _rows_damage(np.frombuffer(raw, np.uint8), header)


def _rows_damage(raw: np.ndarray, header: tuple[int, ...]) -> str | None:
    """Too few bytes for the rows the header gives, or a row whose filter type is unknown."""
    width, height, depth, colour, _, _, interlace = header
    if colour not in _SAMPLES:
        return None
    bits = _SAMPLES[colour] * depth
    passes = _ADAM7 if interlace == 1 else ((0, 0, 1, 1),)
    offset, row = 0, 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns <= 0 or rows <= 0:
            continue
        stride = 1 + -(-columns * bits // 8)
        if offset + rows * stride > raw.size:
            return f"its pixel data holds {raw.size:,} bytes, fewer than its {width}x{height} pixels need"
        filters = raw[offset:offset + rows * stride:stride]
        bad = np.flatnonzero(filters > 4)
        if bad.size:
            return f"row {row + int(bad[0])} of its pixels has filter type {int(filters[bad[0]])} (0 to 4 are valid)"
        offset, row = offset + rows * stride, row + rows
    return None
