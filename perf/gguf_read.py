"""fastverify's own GGUF reader against the ``gguf`` package (llama.cpp's Python reader),
both reading and dequantizing every tensor of the same file to float32 in one process:

    python perf/gguf_read.py [--model smollm2|PATH.gguf] [--repeats 3]

Prints the median seconds of each. (Why the project keeps its own reader.)
"""

import argparse
import statistics
import time

import numpy as np
import torch

from fastverify.models import gguf as ours
from fastverify.models.loaders import resolve_source


def read_ours(path: str) -> dict:
    f = ours.open_gguf(path)
    return {name: f.tensor(name) for name in f.tensors}


def read_gguf_package(path: str) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            for t in reader.tensors}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    path = resolve_source(args.model)
    from importlib.metadata import version
    print(f"{path}\ngguf package {version('gguf')}, torch {torch.__version__}")
    for name, fn in (("fastverify", read_ours), ("gguf package", read_gguf_package)):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tensors = fn(path)
            times.append(time.perf_counter() - t0)
        values = sum(t.numel() for t in tensors.values())
        print(f"{name:13s} {statistics.median(times):6.2f} s median of {args.repeats}  "
              f"({len(tensors)} tensors, {values / 1e6:.0f} M values)")


if __name__ == "__main__":
    main()
