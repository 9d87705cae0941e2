"""What one training step of a torchvision model holds for backward, on CPU: the floor of a worker's memory.

    python benchmarks/activation_memory.py mobilenet_v2 8 224

Sums the distinct tensors autograd saves for backward during the forward pass of a batch
(``torch.autograd.graph.saved_tensors_hooks``) and prints it with the process's peak
resident memory (``VmHWM``) after the imports, after the forward and after the backward.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchvision


def peak_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


def main(name: str, batch: int, resolution: int) -> None:
    torch.set_num_threads(1)
    model = torchvision.models.get_model(name, num_classes=10)
    x = torch.randn(batch, 3, resolution, resolution)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    after_imports = peak_mib()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).logsumexp(1).mean()
    after_forward = peak_mib()
    loss.backward()
    print(
        f"{name}, batch {batch} at {resolution} px: saved for backward {sum(saved.values()) / 2**20:.0f} MiB; "
        f"peak RSS {after_imports} MiB after the imports, {after_forward} after forward, {peak_mib()} after backward"
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
