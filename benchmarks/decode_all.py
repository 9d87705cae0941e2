"""Decode (or read back from the cache) every image of a dataset folder at one resolution, timed.

KDBENCH_CACHE=/tmp/empty python benchmarks/peak_memory.py -- python benchmarks/decode_all.py 224 [FOLDER]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kdbench.data.decode import load_images
from kdbench.data.index import scan_folder

if __name__ == "__main__":
    res = int(sys.argv[1])
    root = Path(sys.argv[2] if len(sys.argv) > 2 else "/work/shared/datasets/eurosat")
    paths = scan_folder(root).paths
    t = time.perf_counter()
    images, bad = load_images(root, paths, res)
    print(f"decoded {len(paths)} images at {res} px: {tuple(images.shape)} in {time.perf_counter() - t:.1f} s", flush=True)
