"""Index, hash and decode (or read back from the cache) every image of a dataset folder at one resolution, timed.

KDBENCH_CACHE=/tmp/empty python benchmarks/peak_memory.py -- python benchmarks/decode_all.py 224 [FOLDER]

Prints the three steps apart: scanning the folder, the content digests every cache is keyed by
(kdbench.data.index.content_digests: each file read once), and decoding or reading the cache.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kdbench.data.decode import load_images
from kdbench.data.index import content_digests, scan_folder

if __name__ == "__main__":
    res = int(sys.argv[1])
    root = Path(sys.argv[2] if len(sys.argv) > 2 else "/work/shared/datasets/eurosat")
    t = time.perf_counter()
    index = scan_folder(root)
    t_scan = time.perf_counter() - t
    t = time.perf_counter()
    digests = content_digests(root, index.files)
    t_hash = time.perf_counter() - t
    print(f"scanned {len(index.files)} images in {t_scan:.2f} s, hashed them in {t_hash:.2f} s", flush=True)
    t = time.perf_counter()
    images, bad = load_images(root, index.files, res, digests=digests, names=index.paths)
    print(f"decoded {len(index.files)} images at {res} px: {tuple(images.shape)} in {time.perf_counter() - t:.1f} s", flush=True)
