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

from fastverify.triton import frspec as fr  # noqa: E402
from fastverify.triton import rejection as rj  # noqa: E402
from fastverify.triton import sparse_kv as sk  # noqa: E402
from fastverify.triton import tree_attention as ta  # noqa: E402

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
        for entropy in (False, True):
            yield f"chunk_stats entropy={entropy}", logit_t, ids_t, rj._chunk_stats_kernel, {
                "logits_ptr": f"*{logit_t}", "stride_l": "i32", "cu_ptr": "*i32", "temp_ptr": "*fp32",
                "thr_ptr": "*fp32", "stats_ptr": "*fp32", "amax_ptr": "*i32", "B": "i32", "R": "i32", "V": "i32",
                "NC": "i32",
            }, {"ROW_EXTRA": 1, "HAS_THR": True, "ENTROPY": entropy, "CHUNK": 4096}, 8
        yield "block_residual", logit_t, ids_t, rj._block_residual_kernel, {
            "logits_ptr": f"*{logit_t}", "stride_l": "i32", "q_ptr": f"*{logit_t}", "stride_q": "i32",
            "draft_ptr": f"*{ids_t}", "cu_ptr": "*i32", "temp_ptr": "*fp32", "thr_ptr": "*fp32", "stats_ptr": "*fp32",
            "amax_ptr": "*i32", "wres_ptr": "*fp32", "B": "i32", "R": "i32", "N": "i32", "V": "i32", "NC": "i32",
            "max_draft_len": "i32",
        }, {"HAS_THR": True, "CHUNK": 4096, "NC_P2": 64, "W_P2": 8}, 4
        for has_q, has_thr, rule in itertools.product((False, True), (False, True), (0, 1, 2)):
            yield f"chain_finalize q={has_q} thr={has_thr} rule={rule}", logit_t, ids_t, rj._chain_finalize_kernel, {
                "logits_ptr": f"*{logit_t}", "stride_l": "i32", "q_ptr": f"*{logit_t}", "stride_q": "i32",
                "draft_ptr": f"*{ids_t}", "cu_ptr": "*i32", "temp_ptr": "*fp32", "seed_ptr": "*i64", "pos_ptr": "*i64",
                "thr_ptr": "*fp32", "stats_ptr": "*fp32", "amax_ptr": "*i32", "wres_ptr": "*fp32", "eps_ptr": "*fp32",
                "delta_ptr": "*fp32", "out_ptr": "*i32", "num_ptr": "*i32", "R": "i32", "N": "i32", "V": "i32",
                "NC": "i32", "max_draft_len": "i32",
            }, {"RULE": rule, "HAS_Q": has_q, "HAS_THR": has_thr, "CHUNK": 4096, "NC_P2": 64, "W_P2": 8}, 4
        for wor, has_thr in itertools.product((False, True), repeat=2):
            yield f"multi_path wor={wor} thr={has_thr}", logit_t, ids_t, rj._multi_path_kernel, {
                "logits_ptr": f"*{logit_t}", "stride_l": "i32", "q_ptr": f"*{logit_t}", "stride_q": "i32",
                "tok_ptr": f"*{ids_t}", "par_ptr": f"*{ids_t}", "cu_ptr": "*i32", "temp_ptr": "*fp32",
                "seed_ptr": "*i64", "pos_ptr": "*i64", "thr_ptr": "*fp32", "stats_ptr": "*fp32", "amax_ptr": "*i32",
                "rbuf_ptr": "*fp32", "wbuf_ptr": "*fp32", "acc_ptr": "*i32", "out_ptr": "*i32", "num_ptr": "*i32",
                "B": "i32", "T": "i32", "V": "i32", "NC": "i32", "max_depth": "i32",
            }, {"WOR": wor, "HAS_THR": has_thr, "CHUNK": 4096, "NC_P2": 64, "D_P2": 8, "NODE_BLOCK": 64}, 4
        for has_q, has_thr in itertools.product((False, True), repeat=2):
            yield f"tree_finalize q={has_q} thr={has_thr}", logit_t, ids_t, rj._tree_finalize_kernel, {
                "logits_ptr": f"*{logit_t}", "stride_l": "i32", "q_ptr": f"*{logit_t}", "stride_q": "i32",
                "tok_ptr": f"*{ids_t}", "par_ptr": f"*{ids_t}", "cu_ptr": "*i32", "temp_ptr": "*fp32", "seed_ptr": "*i64",
                "pos_ptr": "*i64", "thr_ptr": "*fp32", "stats_ptr": "*fp32", "amax_ptr": "*i32", "ws_ptr": "*fp32",
                "acc_ptr": "*i32", "out_ptr": "*i32", "num_ptr": "*i32", "T": "i32", "V": "i32", "NC": "i32",
                "max_depth": "i32",
            }, {"HAS_Q": has_q, "HAS_THR": has_thr, "CHUNK": 4096, "NC_P2": 64, "D_P2": 8, "NODE_BLOCK": 64}, 4


def attention_variants():
    yield "build_tree", "-", "i64", ta._build_tree_kernel, {
        "par_ptr": "*i64", "cu_ptr": "*i32", "prefix_ptr": "*i32", "mask_ptr": "*i64", "pos_ptr": "*i64",
        "depth_ptr": "*i32", "B": "i32", "W": "i32"}, {"W_P2": 4}, 1
    strides = {k: "i32" for k in ("stride_qt", "stride_qh", "stride_kp", "stride_ks", "stride_kh", "stride_vp",
                                   "stride_vs", "stride_vh", "stride_bt")}
    sizes = {k: "i32" for k in ("T", "Hq", "Hkv", "G", "D", "PAGE", "NUM_PAGES", "CAPACITY", "SPLIT")}
    for dt, (D, bm, bn) in itertools.product(("bf16", "fp16"), ((64, 64, 64), (80, 64, 64), (128, 64, 64),
                                                                  (256, 32, 32))):
        d_p2 = max(16, 1 << (D - 1).bit_length())
        yield f"tree_attn_prefix D={D}", dt, "-", ta._prefix_partial_kernel, {
            "q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "bt_ptr": "*i32", "seq_ptr": "*i32",
            "cu_ptr": "*i32", "ws_o_ptr": "*fp32", "ws_ml_ptr": "*fp32", **strides, **sizes, "scale_log2": "fp32",
        }, {"BLOCK_M": bm, "BLOCK_N": bn, "D_P2": d_p2, "UPCAST": False}, 8
        yield f"tree_attn_merge D={D}", dt, "-", ta._tree_merge_kernel, {
            "q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "bt_ptr": "*i32", "seq_ptr": "*i32",
            "cu_ptr": "*i32", "mask_ptr": "*i64", "ws_o_ptr": "*fp32", "ws_ml_ptr": "*fp32", "out_ptr": f"*{dt}",
            **strides, "stride_mt": "i32", "stride_ot": "i32", "stride_oh": "i32", **sizes, "NUM_SPLITS": "i32",
            "scale_log2": "fp32", "W": "i32",
        }, {"BLOCK_M": bm, "BLOCK_N": bn, "D_P2": d_p2, "UPCAST": False}, 8
    yield "compact_kv", "bf16", "i32", ta._compact_kv_kernel, {
        "k_ptr": "*bf16", "v_ptr": "*bf16", "bt_ptr": "*i32", "prefix_ptr": "*i32", "acc_ptr": "*i32",
        "num_ptr": "*i32", "stride_kp": "i32", "stride_ks": "i32", "stride_kh": "i32", "stride_vp": "i32",
        "stride_vs": "i32", "stride_vh": "i32", "stride_bt": "i32", "stride_a": "i32", "PAGE": "i32",
        "CAPACITY": "i32", "D": "i32"}, {"D_P2": 128}, 1


def frspec_variants():
    for dt, (bm, kp2), has_t in itertools.product(("bf16", "fp16", "fp32"), ((16, 2), (16, 8), (64, 8), (32, 64)),
                                                  (False, True)):
        yield f"lm_head_topk_partial M={bm} K={kp2} t={has_t}", dt, "-", fr._topk_partial_kernel, {
            "h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "temp_ptr": "*fp32", "ws_s_ptr": "*fp32", "ws_r_ptr": "*i32",
            "ws_ml_ptr": "*fp32", "stride_h": "i32", "M": "i32", "V": "i32", "D": "i32", "K": "i32",
            "TILES_PER_SPLIT": "i32", "NUM_SPLITS": "i32",
        }, {"HAS_TEMP": has_t, "BLOCK_M": bm, "BLOCK_V": 128, "BLOCK_D": 64, "K_P2": kp2, "UPCAST": False}, 8
    for ids_t, (s_p2, kp2) in itertools.product(("i32", "i64"), ((256, 8), (32, 64), (1024, 2))):
        yield f"lm_head_topk_merge S={s_p2} K={kp2}", "-", ids_t, fr._topk_merge_kernel, {
            "ws_s_ptr": "*fp32", "ws_r_ptr": "*i32", "ws_ml_ptr": "*fp32", "map_ptr": f"*{ids_t}", "ids_ptr": "*i64",
            "lp_ptr": "*fp32", "lse_ptr": "*fp32", "M": "i32", "V": "i32", "K": "i32", "NUM_SPLITS": "i32",
        }, {"HAS_MAP": True, "BLOCK_R": 1, "C_P2": 2048, "S_P2": s_p2, "K_P2": kp2}, 4
    for dt, bm in itertools.product(("bf16", "fp16", "fp32"), (16, 64)):
        yield f"lm_head_sample_partial M={bm}", dt, "-", fr._sample_partial_kernel, {
            "h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "temp_ptr": "*fp32", "seed_ptr": "*i64", "pos_ptr": "*i64",
            "ws_n_ptr": "*fp32", "ws_s_ptr": "*fp32", "ws_r_ptr": "*i32", "ws_ml_ptr": "*fp32", "stride_h": "i32",
            "M": "i32", "V": "i32", "D": "i32", "TILES_PER_SPLIT": "i32", "NUM_SPLITS": "i32",
        }, {"BLOCK_M": bm, "BLOCK_V": 128, "BLOCK_D": 64, "UPCAST": False}, 8
    for ids_t in ("i32", "i64"):
        yield "lm_head_sample_merge", "-", ids_t, fr._sample_merge_kernel, {
            "ws_n_ptr": "*fp32", "ws_s_ptr": "*fp32", "ws_r_ptr": "*i32", "ws_ml_ptr": "*fp32", "map_ptr": f"*{ids_t}",
            "ids_ptr": "*i64", "lp_ptr": "*fp32", "lse_ptr": "*fp32", "M": "i32", "V": "i32", "NUM_SPLITS": "i32",
        }, {"HAS_MAP": True, "BLOCK_R": 1, "S_P2": 512}, 4


def sparse_kv_variants():
    strides = {k: "i32" for k in ("stride_qb", "stride_qh", "stride_kp", "stride_ks", "stride_kh", "stride_vp",
                                   "stride_vs", "stride_vh", "stride_bt", "stride_ib", "stride_ih", "stride_ob",
                                   "stride_oh")}
    sizes = {k: "i32" for k in ("B", "Hq", "Hkv", "G", "D", "PAGE", "NUM_PAGES", "CAPACITY", "CS", "C",
                                "TOKENS_PER_SPLIT")}
    for dt, (D, bn), (bm, direct) in itertools.product(("bf16", "fp16", "fp32"), ((64, 64), (80, 64), (128, 64),
                                                                                   (256, 32)),
                                                        ((16, False), (16, True), (32, False))):
        d_p2 = max(16, 1 << (D - 1).bit_length())
        yield f"sparse_attn_partial D={D} M={bm} direct={direct}", dt, "-", sk._sparse_partial_kernel, {
            "q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "bt_ptr": "*i32", "seq_ptr": "*i32",
            "ids_ptr": "*i32", "ws_o_ptr": "*fp32", "ws_ml_ptr": "*fp32", "out_ptr": f"*{dt}", **strides, **sizes,
            "scale_log2": "fp32",
        }, {"BLOCK_M": bm, "BLOCK_N": bn, "D_P2": d_p2, "UPCAST": False, "DIRECT": direct}, 4 if d_p2 <= 64 else 8
    for dt, (s_p2, d_p2) in itertools.product(("bf16", "fp16", "fp32"), ((2, 128), (64, 128), (64, 256))):
        yield f"sparse_attn_merge S={s_p2} D={d_p2}", dt, "-", sk._sparse_merge_kernel, {
            "ws_o_ptr": "*fp32", "ws_ml_ptr": "*fp32", "out_ptr": f"*{dt}", "stride_ob": "i32", "stride_oh": "i32",
            "B": "i32", "Hq": "i32", "D": "i32", "NUM_SPLITS": "i32",
        }, {"S_P2": s_p2, "D_P2": d_p2}, 4
    for dt, has_means, (cs_blk, block_c), (g_p2, d_p2) in itertools.product(
            ("bf16", "fp16", "fp32"), (False, True), ((8, 4), (16, 2), (32, 2)), ((4, 128), (8, 256), (1, 64))):
        if has_means:
            block_c = 64
        yield f"chunk_scores means={has_means} CS={cs_blk} G={g_p2} D={d_p2}", dt, "-", sk._chunk_scores_kernel, {
            "q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "bt_ptr": "*i32", "seq_ptr": "*i32", "means_ptr": "*fp32",
            "score_ptr": "*fp32", **{k: "i32" for k in ("stride_qb", "stride_qh", "stride_kp", "stride_ks",
                                                         "stride_kh", "stride_bt", "stride_mb", "stride_mc",
                                                         "stride_mh", "Hkv", "G", "D", "PAGE", "NUM_PAGES", "CS",
                                                         "NC")},
        }, {"HAS_MEANS": has_means, "BLOCK_C": block_c, "CS_BLK": cs_blk, "G_P2": g_p2, "D_P2": d_p2}, 4
    yield "select_chunks", "-", "i32", sk._select_kernel, {
        "score_ptr": "*fp32", "seq_ptr": "*i32", "ids_ptr": "*i32",
        **{k: "i32" for k in ("Hkv", "NC", "CS", "N", "SINKS", "RECENT")},
    }, {"BLOCK": 1024, "RADIX": sk.RADIX, "PASSES": sk.PASSES}, 4


def compiled_variants(quick: bool = True, families=("rejection", "tree_attention", "lm_head", "sparse_kv")):
    """(family, name, logits dtype, ids dtype, num_warps, CompiledKernel) of every variant
    (``quick``: one per kernel and ids dtype)."""
    sources = {"rejection": variants, "tree_attention": attention_variants, "lm_head": frspec_variants,
               "sparse_kv": sparse_kv_variants}
    seen = set()
    for family in families:
        for name, logit_t, ids_t, fn, sig, const, warps in sources[family]():
            if quick and (name, ids_t) in seen:
                continue
            seen.add((name, ids_t))
            yield family, name, logit_t, ids_t, warps, compile_kernel(fn, sig, const, warps)


def main(quick: bool) -> int:
    for _, name, logit_t, ids_t, _, k in compiled_variants(quick):
        print(f"ok  {name:32s} logits={logit_t:4s} ids={ids_t}  shared={k.metadata.shared}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(quick="--all" not in sys.argv))
