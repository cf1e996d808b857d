"""Compile every Triton kernel of fastverify for an H100 (sm_90) without a GPU.

The Triton interpreter (how CPU CI runs the kernels) accepts code the real compiler
rejects; this catches that. Run as a script in a process without TRITON_INTERPRET
(tests/test_build.py does). Prints one line per compiled variant.
"""

import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastverify.triton import rejection as rj  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, signature: dict, constexprs: dict, num_warps: int = 4):
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps})


def variants():
    for logit_t, ids_t in itertools.product(("fp32", "bf16", "fp16"), ("i64", "i32")):
        yield "filter_threshold", logit_t, ids_t, rj._filter_threshold_kernel, {
            "logits_ptr": f"*{logit_t}", "stride_l": "i32", "cu_ptr": "*i32", "temp_ptr": "*fp32",
            "topk_ptr": "*i32", "topp_ptr": "*fp32", "thr_ptr": "*fp32", "B": "i32", "V": "i32",
        }, {"ROW_EXTRA": 1, "HAS_TOPK": True, "HAS_TOPP": True, "BLOCK": 1024}, 8
        yield "chunk_stats", logit_t, ids_t, rj._chunk_stats_kernel, {
            "logits_ptr": f"*{logit_t}", "stride_l": "i32", "cu_ptr": "*i32", "temp_ptr": "*fp32", "thr_ptr": "*fp32",
            "stats_ptr": "*fp32", "amax_ptr": "*i32", "B": "i32", "R": "i32", "V": "i32", "NC": "i32",
        }, {"ROW_EXTRA": 1, "HAS_THR": True, "CHUNK": 4096}, 8
        for has_q, has_thr in itertools.product((False, True), repeat=2):
            yield f"chain_finalize q={has_q} thr={has_thr}", logit_t, ids_t, rj._chain_finalize_kernel, {
                "logits_ptr": f"*{logit_t}", "stride_l": "i32", "q_ptr": f"*{logit_t}", "stride_q": "i32",
                "draft_ptr": f"*{ids_t}", "cu_ptr": "*i32", "temp_ptr": "*fp32", "seed_ptr": "*i64", "pos_ptr": "*i64",
                "thr_ptr": "*fp32", "stats_ptr": "*fp32", "amax_ptr": "*i32", "out_ptr": "*i32", "num_ptr": "*i32",
                "R": "i32", "N": "i32", "V": "i32", "NC": "i32", "max_draft_len": "i32",
            }, {"HAS_Q": has_q, "HAS_THR": has_thr, "CHUNK": 4096, "NC_P2": 64, "W_P2": 8}, 4
            yield f"tree_finalize q={has_q} thr={has_thr}", logit_t, ids_t, rj._tree_finalize_kernel, {
                "logits_ptr": f"*{logit_t}", "stride_l": "i32", "q_ptr": f"*{logit_t}", "stride_q": "i32",
                "tok_ptr": f"*{ids_t}", "par_ptr": f"*{ids_t}", "cu_ptr": "*i32", "temp_ptr": "*fp32", "seed_ptr": "*i64",
                "pos_ptr": "*i64", "thr_ptr": "*fp32", "stats_ptr": "*fp32", "amax_ptr": "*i32", "ws_ptr": "*fp32",
                "acc_ptr": "*i32", "out_ptr": "*i32", "num_ptr": "*i32", "T": "i32", "V": "i32", "NC": "i32",
                "max_depth": "i32",
            }, {"HAS_Q": has_q, "HAS_THR": has_thr, "CHUNK": 4096, "NC_P2": 64, "D_P2": 8, "NODE_BLOCK": 64}, 4


def main(quick: bool) -> int:
    seen = set()
    for name, logit_t, ids_t, fn, sig, const, warps in variants():
        if quick and (name, ids_t) in seen:
            continue
        seen.add((name, ids_t))
        k = compile_kernel(fn, sig, const, warps)
        print(f"ok  {name:32s} logits={logit_t:4s} ids={ids_t}  regs={k.n_regs if hasattr(k, 'n_regs') else '?'} "
              f"spills={k.n_spills if hasattr(k, 'n_spills') else '?'} shared={k.metadata.shared}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(quick="--all" not in sys.argv))
