"""CUDA backend: lazy loader of the compiled extension and the backend entry points.

Nothing is compiled or loaded at import. The first call of :func:`library` (made by
the entry points below) loads, in order:

1. an ahead-of-time build: ``fastverify/_C*.so`` next to this file
   (``FASTVERIFY_BUILD_CUDA=1 pip install --no-build-isolation -e .``);
2. else a JIT build of ``csrc/cuda/*.cu`` and ``*.cpp`` with
   ``torch.utils.cpp_extension.load`` (ninja + nvcc), cached in
   ``$FASTVERIFY_CACHE`` (default ``~/.cache/fastverify``) under ``cuda-<hash>``, the
   hash covering the sources, the torch and CUDA versions and the compiler flags.

Sources are taken from ``$FASTVERIFY_CSRC``, else ``<package>/../csrc/cuda`` (a
checkout), else ``<package>/_csrc/cuda`` (a wheel). Set ``FASTVERIFY_VERBOSE_BUILD=1``
to see the build.

The ops it registers, ``torch.ops.fastverify_cuda.{rejection_sample,
tree_rejection_sample, build_tree, tree_attention, compact_kv, lm_head_topk,
lm_head_sample, select_kv_chunks, sparse_kv_attention}``, take what the Triton launchers
compute in Python (chunk width, mask width, softmax scale, prefix / vocabulary / chunk
splits) and the CUDA stream explicitly; the
entry points here (:class:`Kernels`) have the Triton launchers' signatures and fill
those in. tests/cuda_emu builds the same
kernels for the CPU and drives them through the same :class:`Kernels`.
"""

from __future__ import annotations

import glob
import hashlib
import os
import threading
import types

import torch

from ._layout import CHAIN_RULES, TREE_RULES, default_chunk, mask_words

LIB_NAME = "fastverify_cuda"
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_lock = threading.Lock()
_loaded = False


def source_dir() -> str:
    """Folder of the CUDA sources (``csrc/cuda``)."""
    env = os.environ.get("FASTVERIFY_CSRC")
    if env:
        return env
    for cand in (os.path.join(_PKG_DIR, os.pardir, "csrc", "cuda"), os.path.join(_PKG_DIR, "_csrc", "cuda")):
        if os.path.isdir(cand):
            return os.path.normpath(cand)
    raise RuntimeError(
        "fastverify: the CUDA sources (csrc/cuda) were not found next to the package; "
        "set FASTVERIFY_CSRC to their folder")


def sources(folder: str | None = None) -> list[str]:
    """The translation units of the extension: every ``*.cu`` and ``*.cpp`` of the folder."""
    folder = folder or source_dir()
    return sorted(glob.glob(os.path.join(folder, "*.cu")) + glob.glob(os.path.join(folder, "*.cpp")))


def _build_hash(folder: str, cxx_flags, nvcc_flags) -> str:
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        if os.path.isfile(path):
            h.update(os.path.basename(path).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    h.update(torch.__version__.encode())
    h.update(str(torch.version.cuda).encode())
    h.update(repr((list(cxx_flags), list(nvcc_flags))).encode())
    return h.hexdigest()[:16]


def _aot_library() -> str | None:
    found = sorted(glob.glob(os.path.join(_PKG_DIR, "_C*.so")))
    return found[0] if found else None


def _registered() -> bool:
    """Whether this process already holds the kernels (loaded by an earlier call)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{LIB_NAME}::rejection_sample", "CUDA")
    except RuntimeError:  # no such operator yet
        return False


def _jit_build() -> None:
    from torch.utils import cpp_extension

    from ._build_flags import CXX_FLAGS, NVCC_FLAGS

    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if nvcc is None or not os.path.exists(nvcc):
        raise RuntimeError(
            "fastverify: the cuda backend compiles its kernels on first use and needs nvcc, which was not found "
            f"(CUDA_HOME={cuda_home!r}). Install the CUDA toolkit (or set CUDA_HOME), build ahead of time with "
            "FASTVERIFY_BUILD_CUDA=1 pip install --no-build-isolation -e ., or use the triton backend.")
    folder = source_dir()
    srcs = sources(folder)
    if not srcs:
        raise RuntimeError(f"fastverify: no CUDA sources (*.cu, *.cpp) in {folder}")
    cache = os.environ.get("FASTVERIFY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastverify")
    build_dir = os.path.join(cache, "cuda-" + _build_hash(folder, CXX_FLAGS, NVCC_FLAGS))
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(
        name=LIB_NAME,
        sources=srcs,
        extra_cflags=list(CXX_FLAGS),
        extra_cuda_cflags=list(NVCC_FLAGS),
        build_directory=build_dir,
        is_python_module=False,
        verbose=os.environ.get("FASTVERIFY_VERBOSE_BUILD", "0") not in ("", "0"),
    )


def library():
    """Load the extension once (ahead-of-time build, else JIT) and return the
    ``torch.ops.fastverify_cuda`` namespace."""
    global _loaded
    if _loaded:
        return getattr(torch.ops, LIB_NAME)
    with _lock:
        if not _loaded:
            if not torch.cuda.is_available():
                raise RuntimeError("fastverify: the cuda backend needs a CUDA GPU and a CUDA build of torch "
                                   "(torch.cuda.is_available() is False)")
            if not _registered():
                path = _aot_library()
                if path is not None:
                    torch.ops.load_library(path)
                else:
                    _jit_build()
            _loaded = True
    return getattr(torch.ops, LIB_NAME)


def _stream(t: torch.Tensor) -> int:
    """The current CUDA stream of t's device; 0 for CPU tensors (the emulator)."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0


class Kernels:
    """The backend entry points, with the Triton launchers' signatures (unchecked: call
    them through the ops), over one library of ``fastverify_cuda`` ops: ``load()``
    returns its ``torch.ops`` namespace, loading it on first use."""

    OPS = ("rejection_sample", "tree_rejection_sample", "build_tree", "tree_attention", "compact_kv",
           "lm_head_topk", "lm_head_sample", "select_kv_chunks", "sparse_kv_attention")

    def __init__(self, load):
        self._load = load
        self._ops = None

    def ops(self):
        """The ops' default overloads, resolved once."""
        if self._ops is None:
            ns = self._load()
            self._ops = types.SimpleNamespace(**{name: getattr(ns, name).default for name in self.OPS})
        return self._ops

    def rejection_sample(self, target_logits, draft_tokens, cu_num_draft, draft_probs, temperature, top_k, top_p,
                         seed, positions, max_draft_len, verify="token", typical_eps=None, typical_delta=None, *,
                         chunk_size=None):
        """CUDA backend of :func:`fastverify.rejection_sample`. ``chunk_size`` overrides the chunk width."""
        return self.ops().rejection_sample(
            target_logits, draft_tokens, cu_num_draft, draft_probs, temperature, top_k, top_p, seed, positions,
            max_draft_len, CHAIN_RULES[verify], typical_eps, typical_delta,
            chunk_size or default_chunk(target_logits.shape[1]), _stream(target_logits))

    def tree_rejection_sample(self, target_logits, tree_tokens, parents, cu_num_nodes, draft_probs, temperature,
                              top_k, top_p, seed, positions, max_depth, verify="specinfer", *, chunk_size=None):
        """CUDA backend of :func:`fastverify.tree_rejection_sample`."""
        return self.ops().tree_rejection_sample(
            target_logits, tree_tokens, parents, cu_num_nodes, draft_probs, temperature, top_k, top_p, seed,
            positions, max_depth, TREE_RULES[verify], chunk_size or default_chunk(target_logits.shape[1]),
            _stream(target_logits))

    def build_tree(self, parents, cu_num_nodes, prefix_lens, max_nodes):
        """CUDA backend of :func:`fastverify.build_tree`: one thread per node."""
        num_words = mask_words(max_nodes if max_nodes is not None else parents.numel())
        return self.ops().build_tree(parents, cu_num_nodes, prefix_lens, num_words, _stream(parents))

    def tree_attention(self, q, k_cache, v_cache, block_table, seq_lens, cu_num_nodes, tree_mask, sm_scale, *,
                       num_splits=None):
        """CUDA backend of :func:`fastverify.tree_attention`. ``num_splits`` (1 .. 16)
        overrides the number of prefix splits."""
        scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
        return self.ops().tree_attention(q, k_cache, v_cache, block_table, seq_lens, cu_num_nodes, tree_mask,
                                         float(scale), num_splits or 0, _stream(q))

    def compact_kv(self, k_cache, v_cache, block_table, prefix_lens, accepted_nodes, num_accepted):
        """CUDA backend of :func:`fastverify.compact_kv` (in place, one launch)."""
        self.ops().compact_kv(k_cache, v_cache, block_table, prefix_lens, accepted_nodes, num_accepted,
                              _stream(k_cache))

    def lm_head_topk(self, hidden, weight, k, token_map, temperature, *, num_splits=None):
        """CUDA backend of :func:`fastverify.lm_head_topk` (two launches: per-split partial
        top-k and softmax, then the merge). ``num_splits`` overrides the number of V_sub
        splits (clamped to the 128-row tiles)."""
        return self.ops().lm_head_topk(hidden, weight, k, token_map, temperature, num_splits or 0, _stream(hidden))

    def lm_head_sample(self, hidden, weight, temperature, seed, positions, token_map, *, num_splits=None):
        """CUDA backend of :func:`fastverify.lm_head_sample`. ``num_splits`` as in :meth:`lm_head_topk`."""
        return self.ops().lm_head_sample(hidden, weight, temperature, seed, positions, token_map, num_splits or 0,
                                         _stream(hidden))

    def select_kv_chunks(self, q, k_cache, block_table, seq_lens, chunk_size, num_chunks, num_sink_chunks,
                         num_recent_chunks, chunk_means):
        """CUDA backend of :func:`fastverify.select_kv_chunks` (two launches: chunk scores,
        then one exact top-k selection per request and KV head)."""
        return self.ops().select_kv_chunks(q, k_cache, block_table, seq_lens, chunk_size, num_chunks,
                                           num_sink_chunks, num_recent_chunks, chunk_means, _stream(q))

    def sparse_kv_attention(self, q, k_cache, v_cache, block_table, seq_lens, chunk_ids, chunk_size, sm_scale, *,
                            num_splits=None):
        """CUDA backend of :func:`fastverify.sparse_kv_attention` (split-KV over the selected
        chunks, then the log-sum-exp merge; one launch when one split suffices).
        ``num_splits`` (1 .. 64) overrides the number of splits of each KV head's chunks."""
        scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
        return self.ops().sparse_kv_attention(q, k_cache, v_cache, block_table, seq_lens, chunk_ids, chunk_size,
                                              float(scale), num_splits or 0, _stream(q))


_extension = Kernels(library)
rejection_sample = _extension.rejection_sample
tree_rejection_sample = _extension.tree_rejection_sample
build_tree = _extension.build_tree
tree_attention = _extension.tree_attention
compact_kv = _extension.compact_kv
lm_head_topk = _extension.lm_head_topk
lm_head_sample = _extension.lm_head_sample
select_kv_chunks = _extension.select_kv_chunks
sparse_kv_attention = _extension.sparse_kv_attention
