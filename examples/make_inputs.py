#!/usr/bin/env python3
"""Writes the input files of the example jobs (no numpy needed).

With numpy the same files are simply np.save(path, array.astype(np.float32)).
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def save_f32(path, shape, values):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }" % (
        ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "")
    )
    pad = (64 - (10 + len(header) + 1) % 64) % 64
    header = header + " " * pad + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
        f.write(struct.pack("<%df" % len(values), *values))


def main():
    n = 65536
    save_f32(os.path.join(HERE, "saxpy", "x.npy"), (n,), [i * 0.5 for i in range(n)])
    save_f32(os.path.join(HERE, "saxpy", "y.npy"), (n,), [float(i % 7) for i in range(n)])
    with open(os.path.join(HERE, "saxpy", "params.bin"), "wb") as f:
        f.write(struct.pack("<fI", 2.0, n // 8))  # a, elements per task
    m = 128
    save_f32(os.path.join(HERE, "sgemm", "a.npy"), (m, m), [((i * 7) % 17) / 17.0 - 0.5 for i in range(m * m)])
    save_f32(os.path.join(HERE, "sgemm", "b.npy"), (m, m), [((i * 3) % 19) / 19.0 for i in range(m * m)])
    g = 256
    hot = lambda i: 100.0 if abs(i // g - g // 2) < 8 and abs(i % g - g // 2) < 8 else 0.0
    save_f32(os.path.join(HERE, "heat", "grid.npy"), (g, g), [hot(i) for i in range(g * g)])
    with open(os.path.join(HERE, "heat", "params.bin"), "wb") as f:
        f.write(struct.pack("<IIf", g, g, 0.2))  # width, height, alpha


if __name__ == "__main__":
    main()
