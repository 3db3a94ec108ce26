"""Real, small PNG and JPEG images made from a seed, standard library only (demo, bench, tests).

Different seeds give different bytes (and different pixels), the same seed the same bytes.
"""

from __future__ import annotations

import random
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def _png(width: int, height: int, rng: random.Random, *, level: int) -> bytes:
    # 8-bit RGB, no interlace; every scanline starts with filter type 0 (None).
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"".join(b"\x00" + rng.randbytes(3 * width) for _ in range(height))
    return (
        PNG_SIGNATURE
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw, level))
        + _png_chunk(b"IEND", b"")
    )


def make_png(seed: int, size: int = 16) -> bytes:
    """A valid size x size RGB PNG whose pixels depend on ``seed``."""
    return _png(size, size, random.Random(f"png:{seed}"), level=9)


def make_png_of_size(n_bytes: int, seed: int) -> bytes:
    """A valid PNG of at least ``n_bytes`` bytes: random pixels, stored uncompressed."""
    width = 1024
    row = 3 * width + 1
    height = max(1, -(-n_bytes // row))
    return _png(width, height, random.Random(f"big-png:{seed}"), level=0)


# A baseline JPEG, 16x16 grayscale: four 8x8 blocks, each of one flat grey chosen by the seed.
# Flat blocks have only a DC coefficient, so two tiny Huffman tables suffice:
# DC categories 0..8 all get 4-bit codes 0000..1000; AC has only EOB (0x00), code "0".
_DQT = b"\xff\xdb" + struct.pack(">HB", 67, 0) + bytes([8] * 64)
_SOF0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 16, 16, 1) + bytes([1, 0x11, 0])
_DHT_DC = b"\xff\xc4" + struct.pack(">HB", 3 + 16 + 9, 0x00) + bytes([0, 0, 0, 9] + [0] * 12)
_DHT_DC += bytes(range(9))
_DHT_AC = b"\xff\xc4" + struct.pack(">HB", 3 + 16 + 1, 0x10) + bytes([1] + [0] * 15) + b"\x00"
_SOS = b"\xff\xda" + struct.pack(">HB", 8, 1) + bytes([1, 0x00, 0, 63, 0])


def _jpeg_scan(greys: list[int]) -> bytes:
    bits: list[str] = []
    previous = 0
    for grey in greys:
        # With every quantizer 8, a flat block's quantized DC is exactly grey - 128.
        dc = grey - 128
        diff, previous = dc - previous, dc
        category = abs(diff).bit_length()
        bits.append(format(category, "04b"))
        if category:
            value = diff if diff >= 0 else diff + (1 << category) - 1
            bits.append(format(value, f"0{category}b"))
        bits.append("0")  # EOB
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    out = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        out.append(byte)
        if byte == 0xFF:
            out.append(0x00)  # byte stuffing
    return bytes(out)


def make_jpeg(seed: int) -> bytes:
    """A valid baseline 16x16 grayscale JPEG; pixels and a COM segment depend on ``seed``."""
    rng = random.Random(f"jpeg:{seed}")
    # Keep |diff| between neighbouring blocks < 256 so category 8 is the largest needed.
    greys = [rng.randrange(8, 248) for _ in range(4)]
    comment = f"seed={seed}".encode()
    com = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    return (
        b"\xff\xd8"
        + com
        + _DQT
        + _SOF0
        + _DHT_DC
        + _DHT_AC
        + _SOS
        + _jpeg_scan(greys)
        + b"\xff\xd9"
    )
