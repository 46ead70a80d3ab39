"""BLAKE3 of bytes or of a file read a few MiB at a time: the names blobs
are uploaded under."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import blake3


def blake3_hex(data: Union[bytes, str, Path]) -> str:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return blake3.blake3(bytes(data)).hexdigest()
    h = blake3.blake3()
    with open(data, "rb") as f:
        while True:
            b = f.read(4 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)
