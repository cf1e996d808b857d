"""Time one target forward of the reference model over M tokens per step (a decode
step is M = 1; verifying k drafts is M = k + 1) after a 200-token prompt: on the GGUF's
own blocks (``weights="native"``: the block kernels of ``csrc/cpu/quant.h`` in the fused
step) and on the weights dequantized to fp32 with the fused CPU step (``csrc/cpu/step.cpp``,
1–16 rows) and with the torch layers (``F.linear``, ``tree_attention``):

    python perf/decode_step.py [--model smollm2] [--threads N] [--rows 1,2,4,8,16,32]

Prints a markdown table of median ms per forward and the speedups.
"""

import argparse
import statistics
import time

import torch

from fastverify.models import Step, chain_parents, load


def time_forward(model, rows: int, repeats: int = 7) -> float:
    cache = model.new_cache(1, 512)
    with torch.no_grad():
        cu = torch.tensor([0, 200], dtype=torch.int32)
        prompt = torch.randint(0, model.config.vocab_size, (200,), generator=torch.Generator().manual_seed(0))
        model(prompt, Step.build(cache, torch.tensor([0]), chain_parents(cu), cu, torch.zeros(1, dtype=torch.int32)),
              cache)
        cu = torch.tensor([0, rows], dtype=torch.int32)
        step = Step.build(cache, torch.tensor([0]), chain_parents(cu), cu, torch.tensor([200], dtype=torch.int32))
        tokens = prompt[:rows]
        model(tokens, step, cache)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(tokens, step, cache)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rows", default="1,2,4,8,16,32")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model, weights="dequant")
    native = load(args.model, weights="native") if args.model.endswith(".gguf") or args.model == "smollm2" else None
    print(f"{args.model}, {torch.get_num_threads()} threads\n")
    print("| rows M | fp32 torch layers ms | fp32 fused step ms | native blocks, fused step ms | native vs fp32 fused |")
    print("|--:|--:|--:|--:|--:|")
    for rows in (int(r) for r in args.rows.split(",")):
        fast = time_forward(model.use_cpu_kernels(True), rows)
        plain = time_forward(model.use_cpu_kernels(False), rows)
        blocks = time_forward(native, rows) if native is not None else float("nan")
        print(f"| {rows} | {plain:.1f} | {fast:.1f} | {blocks:.1f} | {fast / blocks:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
