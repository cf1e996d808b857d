"""End-to-end comparison: every decoding method of :mod:`fastverify.decoding`, Hugging
Face transformers' own ``generate`` (plain, prompt lookup, early-exit assisted) and, when
``llama-cpp-python`` is installed and the model is a GGUF, llama.cpp on the same file
(autoregressive and its prompt-lookup decoding), on the same prompts and machine, one
prompt at a time, with the same number of threads.

Greedy runs are checked token for token against fastverify's autoregressive baseline;
a divergence is accepted only where the baseline's top-2 logits at the diverging
position differ by less than ``tie_tolerance`` (a floating-point near-tie), and every
divergence is reported. At a sampling temperature (``temperature > 0``) the rows are the
verification rules (RULE_METHODS) on sampled runs: their tokens differ from the baseline's
by the draws, so the table states each rule's output law instead — the target's (every
lossless rule, proven in tests/test_verify_rules.py) or LOSSY (typical acceptance).

Weights: a GGUF model loaded with its blocks kept (``weights="native"``) runs fastverify's
rows on those blocks, and a few fp32 rows (:data:`FP32_METHODS`) on the same file
dequantized to fp32, beside transformers on those fp32 weights. Each kind of weights has
its own autoregressive baseline for the same-tokens check. The report also states how many
of llama.cpp's greedy tokens each baseline reproduces (:func:`agreement`) and the memory
and load time of each engine in a fresh process (:func:`measure_memory`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .decoding import encode_prompts, generate
from .models import unfuse_hf
from .models.quantized import BLOCK_TYPES, QuantizedEmbedding, QuantizedLinear, is_native, weight_bytes

# Prompts of the kinds speculative decoding is judged on: summarising and editing
# (much of the answer copies the prompt) and open questions (little does).
PROMPTS = {
    "summarize": (
        "Summarize the following paragraph in two sentences.\n\n"
        "The city council met on Tuesday to discuss the new public library. The library will be built on the "
        "site of the old train station, which has been empty for ten years. The council voted to spend two "
        "million dollars on the project, and construction will start in the spring. The new library will have a "
        "children's room, a large reading hall, and a cafe. The mayor said that the library will be a place where "
        "people of all ages can learn and meet each other. Some residents worried about the cost, but most "
        "people at the meeting supported the plan."),
    "code-edit": (
        "Rename the variable `total` to `running_sum` in this Python function and return the whole function.\n\n"
        "```python\n"
        "def average(values):\n"
        "    total = 0\n"
        "    count = 0\n"
        "    for value in values:\n"
        "        total += value\n"
        "        count += 1\n"
        "    if count == 0:\n"
        "        return 0.0\n"
        "    return total / count\n"
        "```"),
    "extract": (
        "List every city mentioned in this text, one per line.\n\n"
        "Anna flew from Paris to Berlin in May, then took the train to Vienna and Prague. In June she visited "
        "friends in Madrid and Lisbon before returning to Paris."),
    "explain": "Explain in a few sentences why the sky is blue.",
}

# (label, method, drafter[, options]) of fastverify's runs; the first is the baseline.
METHODS = [
    ("ar", "ar", None),
    ("chain/ngram", "chain", "ngram"),
    ("tree/ngram", "tree", "ngram"),
    ("chain/layerskip", "chain", "layerskip"),
    ("tree/layerskip", "tree", "layerskip"),
    # the drafters trained for the model (fastverify/checkpoints; rows skipped for models without them)
    ("chain/eagle3", "chain", "eagle3"),
    ("tree/eagle3", "tree", "eagle3"),
    ("chain/medusa", "chain", "medusa"),
    ("tree/medusa", "tree", "medusa"),
]
# At a sampling temperature: the verification rules on the layer-skip drafter's drafts
# (chains of 4; 3 paths of 4 tokens) beside ar and n-gram chains.
RULE_METHODS = [
    ("ar", "ar", None),
    ("chain/ngram", "chain", "ngram"),
    ("chain/layerskip token", "chain", "layerskip", dict(verify="token")),
    ("chain/layerskip block", "chain", "layerskip", dict(verify="block")),
    ("chain/layerskip typical", "chain", "layerskip", dict(verify="typical")),
    ("paths/layerskip specinfer", "tree", "layerskip", dict(tree_paths=3, tree_depth=4, verify="specinfer")),
    ("paths/layerskip block", "tree", "layerskip", dict(tree_paths=3, tree_depth=4, verify="block")),
    ("paths/layerskip block_wor", "tree", "layerskip", dict(tree_paths=3, tree_depth=4, verify="block_wor")),
    ("chain/eagle3 block", "chain", "eagle3", dict(verify="block")),
    ("tree/eagle3", "tree", "eagle3"),
    ("chain/medusa block", "chain", "medusa", dict(verify="block")),
    ("tree/medusa", "tree", "medusa"),
]
QUICK_RULE_METHODS = ["ar", "chain/layerskip token", "chain/layerskip block", "paths/layerskip block"]
HF_METHODS = ["hf", "hf/prompt-lookup", "hf/early-exit"]
LLAMA_CPP_METHODS = ["llama.cpp", "llama.cpp/prompt-lookup"]
# With native (GGUF block) weights: these rows again on the file dequantized to fp32, the
# weights transformers runs on; the first is their baseline.
FP32_METHODS = [
    ("ar (fp32)", "ar", None),
    ("chain/ngram (fp32)", "chain", "ngram"),
]
# --quick: the baseline, the best n-gram method on CPU, and the references' plain and prompt-lookup runs
QUICK_METHODS = ["ar", "chain/ngram", "tree/eagle3"]
QUICK_FP32_METHODS = ["ar (fp32)"]
QUICK_HF_METHODS = ["hf", "hf/prompt-lookup"]
REFERENCE_PREFIXES = ("hf", "llama.cpp")


def drafter_rows(model, methods: list) -> tuple[list, list[str]]:
    """``methods`` without the rows whose trained drafter (eagle3 / medusa) the model has
    none of, and a note per drafter left out."""
    from .decoding.heads import KINDS, has_committed

    missing = sorted({m[2] for m in methods if m[2] in KINDS and not has_committed(model, m[2])})
    notes = [f"{kind} rows: not run — fastverify ships no {kind} drafter for this model (train one with "
             f"`fastverify train-drafter --kind {kind} --out DIR`)." for kind in missing]
    return [m for m in methods if m[2] not in missing], notes


@dataclass
class Row:
    label: str
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    accepted: int = 0            # drafts accepted over all steps (fastverify runs)
    draft_s: float = 0.0
    verify_s: float = 0.0
    sample_s: float = 0.0
    prefill_s: float = 0.0
    same_as_ar: int = 0          # prompts whose tokens equal the baseline's
    per_prompt: dict = field(default_factory=dict)  # prompt -> [tokens, seconds]
    ties: list = field(default_factory=list)        # (prompt, position, margin) accepted near-ties
    divergences: list = field(default_factory=list)  # (prompt, position, margin) real mismatches
    weights: str = "dequant"     # "native" (GGUF blocks), "dequant" (float weights) or "llama.cpp" (its own)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else float("nan")


def hf_twin(model):
    """The transformers model with the same weights as ``model`` (built locally, no hub)."""
    import transformers

    cfg = dict(model.hf_config)
    arch = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(arch, **{k: v for k, v in cfg.items() if k != "architectures"})
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = hf.load_state_dict(unfuse_hf(model.state_dict(), model.config), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"transformers twin: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf.to(model.device).eval()


def lossy(label: str) -> bool:
    """Whether a row's rule does not keep the target's distribution (typical acceptance)."""
    return label.endswith("typical")


def _hf_generate(hf, ids: list[int], kind: str, max_new_tokens: int, eos: list[int], early_exit: int,
                 temperature: float = 0.0):
    x = torch.tensor([ids], device=hf.device)
    sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)
    kw = dict(max_new_tokens=max_new_tokens, eos_token_id=eos or None,
              pad_token_id=eos[0] if eos else 0, attention_mask=torch.ones_like(x), **sample)
    if kind == "hf/prompt-lookup":
        kw["prompt_lookup_num_tokens"] = 10
    elif kind == "hf/early-exit":
        kw["assistant_early_exit"] = early_exit
    t0 = time.perf_counter()
    out = hf.generate(x, **kw)
    return out[0, len(ids):].tolist(), time.perf_counter() - t0


def llama_cpp_available(model) -> str | None:
    """Why llama.cpp rows cannot run (None: they can): llama-cpp-python installed and the
    model loaded from a GGUF file."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install -e '.[llama]', builds from source in ~6 min)"
    if not str(getattr(model, "source", "")).endswith(".gguf"):
        return "the model was not loaded from a GGUF file"
    return None


def llama_cpp_model(model, threads: int, prompt_lookup: bool):
    """llama.cpp on the GGUF ``model`` came from (its own weights, e.g. Q4_1 where
    fastverify dequantizes to fp32), ``threads`` threads; prompt lookup drafts 10 tokens."""
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    return llama_cpp.Llama(model_path=model.source, n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                           n_batch=512, verbose=False,
                           draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10) if prompt_lookup else None)


def _llama_cpp_generate(llm, ids: list[int], max_new_tokens: int, eos: list[int], temperature: float = 0.0):
    """Tokens (greedy, or sampled at ``temperature``) and seconds of llama.cpp on the prompt
    ids (prefill included)."""
    llm.reset()
    out = []
    t0 = time.perf_counter()
    top_k = 1 if temperature == 0 else 0
    for tok in llm.generate(ids, top_k=top_k, top_p=1.0, min_p=0.0, temp=temperature, repeat_penalty=1.0,
                            reset=True):
        if tok in eos:
            break
        out.append(int(tok))
        if len(out) >= max_new_tokens:
            break
    return out, time.perf_counter() - t0


def first_divergence(model, prompt: list[int], base: list[int], other: list[int]):
    """(position, top-2 margin of the baseline's logits there), or None when ``other``
    is ``base`` (or a prefix of it cut by the token budget)."""
    n = min(len(base), len(other))
    pos = next((i for i in range(n) if base[i] != other[i]), None)
    if pos is None:
        return None if len(base) == len(other) else (n, float("inf"))
    logits = model.score(torch.tensor([prompt + base[:pos]], device=model.device))[0, -1].float()
    top = logits.topk(2).values
    return pos, float(top[0] - top[1])


def weights_kind(model) -> str:
    """"native" (projections on GGUF blocks) or "dequant" (float weights)."""
    return getattr(model, "weights", None) or ("native" if is_native(model) else "dequant")


def model_info(model) -> dict:
    """What a report states of a model's weights: their kind, the activations' dtype, the
    ggml block types it keeps (none when dequantized) and the bytes a decode step reads."""
    types = set()
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            types.update(m.part_types)
        elif isinstance(m, QuantizedEmbedding):
            types.add(m.ggml_type)
    return {"weights": weights_kind(model), "dtype": str(model.dtype).removeprefix("torch."),
            "block_types": sorted(BLOCK_TYPES[t] for t in types), "weight_bytes": weight_bytes(model)}


def describe_weights(info: dict) -> str:
    """One line for :func:`model_info`'s dict, e.g. "native (Q4_1, Q8_0 blocks, 98 MB)"."""
    size = f"{info['weight_bytes'] / 1e6:.0f} MB"
    if info["weights"] == "native":
        return f"native ({', '.join(info['block_types'])} blocks, {size})"
    return f"dequant ({info['dtype']}, {size})"


def gguf_file_info(path: str) -> dict | None:
    """The GGUF file's size and the count of its tensors of each ggml type (None: not a GGUF)."""
    from .models import gguf

    if not str(path).endswith(".gguf") or not os.path.isfile(path):
        return None
    types: dict[str, int] = {}
    for info in gguf.open_gguf(path).tensors.values():
        name = gguf.ggml_type_name(info.ggml_type)
        types[name] = types.get(name, 0) + 1
    return {"path": str(path), "bytes": os.path.getsize(path), "tensor_types": types}


def agreement(ours: list[int], theirs: list[int]) -> dict:
    """How far two greedy runs agree: the common prefix, the positions holding the same
    token, out of the longer run's length (a run cut short by EOS disagrees on the rest)."""
    prefix = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    equal = sum(a == b for a, b in zip(ours, theirs))
    return {"prefix": prefix, "equal": equal, "length": max(len(ours), len(theirs))}


def run(model, *, prompts: dict | None = None, methods=None, hf_methods=None, llama_methods=None,
        fp32_model=None, fp32_methods=None, max_new_tokens: int = 64, tie_tolerance: float = 1e-3,
        options: dict | None = None, progress_bar: bool = True, temperature: float = 0.0, seed: int = 0) -> dict:
    """Run every method on every prompt (greedy, or sampled at ``temperature``; batch 1),
    streaming a line per run under a progress bar; returns the report dict.

    ``prompts``: name -> text (or token-id list). ``methods`` run on ``model`` (native or
    dequantized weights); ``fp32_methods`` (labels of their own, e.g. "ar (fp32)") on
    ``fp32_model``, the same checkpoint dequantized, which transformers' rows also use
    (needed when ``model`` is native and either list is non-empty). Greedy rows are checked
    against the first row of their own weights (fp32 rows and transformers: the fp32 ar;
    llama.cpp: the native ar when there is one)."""
    prompts = prompts or PROMPTS
    methods = methods if methods is not None else METHODS
    hf_methods = hf_methods if hf_methods is not None else HF_METHODS
    llama_methods = list(llama_methods or [])
    fp32_methods = list(fp32_methods or [])
    options = options or {}
    kind = weights_kind(model)
    if kind == "native" and (hf_methods or fp32_methods):
        if fp32_model is None:
            raise ValueError("fp32_model: transformers' rows and fp32 rows need the checkpoint dequantized "
                             "(models.load(source, weights='dequant')) beside the native model")
        if weights_kind(fp32_model) != "dequant":
            raise ValueError("fp32_model must hold dequantized weights (weights='dequant')")
        if temperature == 0 and hf_methods and (not fp32_methods or fp32_methods[0][1] != "ar"):
            fp32_methods = [FP32_METHODS[0]] + fp32_methods  # transformers' baseline: ar on the same weights
    if kind == "dequant":
        if fp32_methods:
            raise ValueError(f"fp32_methods ({', '.join(m[0] for m in fp32_methods)}) need a model with native "
                             f"weights; this model is already dequantized")
        fp32_model = model
    ids = {name: encode_prompts(model, [text])[0] for name, text in prompts.items()}
    eos = sorted(model.config.eos_ids)
    rows: dict[str, Row] = {}
    # per kind of weights: the model that scores a divergence, and its baseline's tokens per prompt
    scorers = {kind: model, "dequant": fp32_model}
    base: dict[str, dict[str, list[int]]] = {kind: {}, "dequant": {}}
    llama_tokens: dict[str, list[int]] = {}
    total = len(prompts) * (len(methods) + len(fp32_methods) + len(hf_methods) + len(llama_methods))
    bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True, disable=not progress_bar)

    def progress(label, name, tokens, seconds):
        bar.update(1)
        bar.write(f"{label:<24} {name:<10} {tokens:>4} tokens {tokens / seconds:6.1f} tok/s")

    def check(row, name, prompt, tokens, against):
        if temperature == 0:
            _check(scorers[against], row, name, prompt, base[against], tokens, tie_tolerance)

    for runs, target in ((methods, model), (fp32_methods, fp32_model)):
        if not runs:
            continue
        target_kind = weights_kind(target)
        generate(target, [ids[next(iter(ids))]], max_new_tokens=4)   # warm up kernels and allocator
        for label, method, drafter, *extra in runs:   # extra: options of this method only
            row = rows.setdefault(label, Row(label, weights=target_kind))
            for name, prompt in ids.items():
                r = generate(target, [prompt], method=method, drafter=drafter, max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed, **{**options, **(extra[0] if extra else {})})
                s = r.stats
                row.tokens += s.new_tokens
                row.seconds += s.seconds
                row.per_prompt[name] = [s.new_tokens, s.seconds]
                row.steps += s.steps
                row.accepted += sum(s.accepted[0])
                for k in ("draft_s", "verify_s", "sample_s", "prefill_s"):
                    setattr(row, k, getattr(row, k) + getattr(s, k))
                check(row, name, prompt, r.tokens[0], target_kind)
                progress(label, name, s.new_tokens, s.seconds)
    if hf_methods:
        hf = hf_twin(fp32_model)
        early_exit = max(1, model.config.n_layers // 2)
        with torch.no_grad():
            _hf_generate(hf, ids[next(iter(ids))], "hf", 4, eos, early_exit)
            for hf_kind in hf_methods:
                row = rows.setdefault(hf_kind, Row(hf_kind, weights="dequant"))
                for name, prompt in ids.items():
                    out, seconds = _hf_generate(hf, prompt, hf_kind, max_new_tokens, eos, early_exit, temperature)
                    row.tokens += len(out)
                    row.seconds += seconds
                    row.per_prompt[name] = [len(out), seconds]
                    check(row, name, prompt, out, "dequant")
                    progress(hf_kind, name, len(out), seconds)
        del hf
    fastverify_base = {k: dict(v) for k, v in base.items()}   # before llama.cpp could set an empty one
    for llama_kind in llama_methods:
        llm = llama_cpp_model(model, torch.get_num_threads(), prompt_lookup=llama_kind.endswith("prompt-lookup"))
        _llama_cpp_generate(llm, ids[next(iter(ids))], 4, eos)                # warm up
        row = rows.setdefault(llama_kind, Row(llama_kind, weights="llama.cpp"))
        for name, prompt in ids.items():
            out, seconds = _llama_cpp_generate(llm, prompt, max_new_tokens, eos, temperature)
            row.tokens += len(out)
            row.seconds += seconds
            row.per_prompt[name] = [len(out), seconds]
            check(row, name, prompt, out, kind)   # the same file's weights when native
            if llama_kind == "llama.cpp":
                llama_tokens[name] = out
            progress(llama_kind, name, len(out), seconds)
        del llm
    bar.close()
    report = {"rows": [dict(asdict(r), tokens_per_s=r.tokens_per_s, tokens_per_step=r.tokens_per_step)
                       for r in rows.values()],
              "prompts": {k: len(v) for k, v in ids.items()}, "max_new_tokens": max_new_tokens,
              "tie_tolerance": tie_tolerance, "threads": torch.get_num_threads(), "dtype": str(model.dtype),
              "temperature": temperature, "seed": seed, "weights": kind,
              "models": {kind: model_info(model)}, "file": gguf_file_info(getattr(model, "source", ""))}
    if fp32_model is not model and (fp32_methods or hf_methods):
        report["models"]["dequant"] = model_info(fp32_model)
    if temperature == 0 and llama_tokens:
        # fastverify's ar of each kind of weights (its baseline) against llama.cpp's ar, per prompt
        report["agreement"] = {k: {name: agreement(fastverify_base[k][name], llama_tokens[name])
                                   for name in llama_tokens if name in fastverify_base[k]}
                               for k in dict.fromkeys((kind, "dequant")) if fastverify_base[k]}
    return report


def _check(model, row: Row, name: str, prompt, base: dict, tokens: list[int], tol: float) -> None:
    if name not in base:
        base[name] = tokens
        row.same_as_ar += 1
        return
    d = first_divergence(model, prompt, base[name], tokens)
    if d is None:
        row.same_as_ar += 1
    elif d[1] < tol:
        row.ties.append((name, d[0], d[1]))
    else:
        row.divergences.append((name, d[0], d[1]))


def winner(report: dict) -> str:
    """One line: the fastest run, and the fastest fastverify method against the fastest
    reference (transformers, llama.cpp) of the same report. Lossy rows never win."""
    rows = [r for r in report["rows"] if r["tokens_per_s"] and not lossy(r["label"])
            and (r["label"].startswith("llama.cpp") or not r["divergences"])]
    if not rows:
        return "winner: none (no run finished)"
    best = max(rows, key=lambda r: r["tokens_per_s"])
    ours = [r for r in rows if not r["label"].startswith(REFERENCE_PREFIXES)]
    refs = [r for r in rows if r["label"].startswith(REFERENCE_PREFIXES)]
    line = f"winner: {best['label']} at {best['tokens_per_s']:.1f} tokens/s"
    if ours and refs:
        a, b = max(ours, key=lambda r: r["tokens_per_s"]), max(refs, key=lambda r: r["tokens_per_s"])
        line += (f"; best fastverify method {a['label']} {a['tokens_per_s']:.1f} vs best reference {b['label']} "
                 f"{b['tokens_per_s']:.1f} tokens/s ({a['tokens_per_s'] / b['tokens_per_s']:.2f}×)")
    return line


def _weights_cell(report: dict, weights: str, short: bool = False) -> str:
    """A row's weights in words, from the report's model info ("Q4_1/Q8_0 blocks", "float32")."""
    if weights == "llama.cpp":   # the file's own blocks, on llama.cpp's kernels
        f = report.get("file") or {}
        types = "/".join(sorted(t for t in f.get("tensor_types", {}) if t not in ("F32", "F16", "BF16"))) or "GGUF"
        return types if short else f"the file's {types} (llama.cpp)"
    info = report.get("models", {}).get(weights)
    if info is None:
        return weights
    if weights == "native":
        return "/".join(info["block_types"]) + ("" if short else " blocks")
    return info["dtype"]


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:.0f} MB"


def render_models(report: dict) -> list[str]:
    """Lines: the file's tensor types and each loaded model's weights."""
    lines = []
    f = report.get("file")
    if f:
        types = ", ".join(f"{n}× {t}" for t, n in sorted(f["tensor_types"].items(), key=lambda kv: -kv[1]))
        lines += [f"GGUF file: {os.path.basename(f['path'])}, {_mb(f['bytes'])}; tensors {types}", ""]
    models = report.get("models", {})
    if models:
        lines += ["| weights | activations | block types | weight bytes read per step | load time (this run) |",
                  "|---|---|---|---:|---:|"]
        for kind, info in models.items():
            load = f"{info['load_s']:.1f} s" if "load_s" in info else "–"
            lines.append(f"| {kind} | {info['dtype']} | {', '.join(info['block_types']) or '– (dense)'} | "
                         f"{_mb(info['weight_bytes'])} | {load} |")
    return lines


def render_agreement(report: dict) -> list[str]:
    """Lines: per prompt, how many of llama.cpp's greedy tokens each fastverify ar reproduces."""
    agree = report.get("agreement")
    if not agree:
        return []
    kinds = list(agree)
    label = {"native": "fastverify ar (native)", "dequant": "fastverify ar (fp32)"}
    lines = ["agreement with llama.cpp's greedy tokens (common prefix, equal positions / generated length; "
             "reported, never required — different arithmetic, and fp32 differs from the file's blocks):", "",
             "| prompt | " + " | ".join(label.get(k, k) for k in kinds) + " |", "|---|" + "---:|" * len(kinds)]
    names = list(dict.fromkeys(n for k in kinds for n in agree[k]))
    for name in names:
        cells = []
        for k in kinds:
            a = agree[k].get(name)
            cells.append(f"prefix {a['prefix']}, equal {a['equal']} / {a['length']}" if a else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def render_memory(report: dict) -> list[str]:
    """Lines: load time and resident memory of each engine, each in a fresh process."""
    memory = report.get("memory")
    if not memory:
        return []
    lines = [f"memory and load time, each in a fresh python process ({report.get('memory_threads', '?')} threads; "
             "RSS = VmRSS; the baseline is the same interpreter after its imports):", "",
             "| engine | load | RSS after imports | RSS after load | above imports | of which mapped file pages "
             f"| RSS after {memory[0].get('new_tokens', 4)} tokens |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in memory:
        if "error" in m:
            lines.append(f"| {m['kind']} | failed: {m['error']} | | | | | |")
            continue
        lines.append(f"| {m['kind']} | {m['load_s']:.2f} s | {_mb(m['rss_imports'])} | {_mb(m['rss_load'])} | "
                     f"{_mb(m['above_imports'])} | {_mb(m.get('file_load', 0))} | {_mb(m['rss_generate'])} |")
    if any(m["kind"] == "llama.cpp" and "error" not in m for m in memory):
        lines += ["", "llama.cpp maps the GGUF file (mmap): its RSS counts only the file pages it has touched "
                      "(few right after loading, the weights once a step has read them), and those pages are the "
                      "page cache's, shared and reclaimable; fastverify copies the weights into its own memory. "
                      "llama.cpp also allocates its KV cache for n_ctx=4096 when it loads; fastverify allocates "
                      "its cache when it generates."]
    return lines


def render_markdown(report: dict) -> str:
    rows = report["rows"]
    hf = next((r for r in rows if r["label"] == "hf"), None)
    ar = rows[0]
    n = len(report["prompts"])
    sampled = report.get("temperature", 0) > 0
    native = report.get("weights") == "native"
    lines = [
        "| method | weights | tokens/s | tokens per target forward | vs transformers generate | vs fastverify ar "
        "| draft / verify / sample share | " + ("output law |" if sampled else "same tokens as ar of its weights |"),
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        tps = r["tokens_per_s"]
        vs_hf = f"{tps / hf['tokens_per_s']:.2f}×" if hf and hf["tokens_per_s"] else "–"
        vs_ar = f"{tps / ar['tokens_per_s']:.2f}×" if ar["tokens_per_s"] else "–"
        tau = f"{r['tokens_per_step']:.2f}" if r["steps"] else "–"
        shares = (f"{r['draft_s'] / r['seconds']:.0%} / {r['verify_s'] / r['seconds']:.0%} / "
                  f"{r['sample_s'] / r['seconds']:.0%}") if r["steps"] and r["seconds"] else "–"
        same = f"{r['same_as_ar']}/{n}"
        if r["ties"]:
            same += f" (+{len(r['ties'])} near-tie)"
        if r["label"].startswith("llama.cpp"):
            same += (" vs native ar (same blocks, its own arithmetic: not expected to match)" if native else
                     " (its own quantized weights: not expected to match)")
        elif r["divergences"]:
            same += f" — {len(r['divergences'])} DIVERGED"
        if sampled:
            same = ("LOSSY (typical acceptance)" if lossy(r["label"]) else
                    "its own sampler" if r["label"].startswith(REFERENCE_PREFIXES) else "the target's (lossless)")
        weights = _weights_cell(report, r.get("weights", "dequant"))
        lines.append(f"| {r['label']} | {weights} | {tps:.1f} | {tau} | {vs_hf} | {vs_ar} | {shares} | {same} |")
    names = list(report["prompts"])
    lines += ["", "tokens/s per prompt:", "", "| method | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
    for r in rows:
        cells = [f"{t / sec:.1f}" if sec else "–" for t, sec in (r["per_prompt"].get(n, (0, 0)) for n in names)]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    for section in (render_models(report), render_agreement(report), render_memory(report)):
        if section:
            lines += [""] + section
    for note in report.get("notes", []):
        lines += ["", note]
    return "\n".join(lines + ["", winner(report)])


def _bar_color(report: dict, row: dict) -> str:
    """transformers gray, llama.cpp orange, fastverify blue (lighter: its fp32 rows beside native ones)."""
    if row["label"].startswith("hf"):
        return "tab:gray"
    if row["label"].startswith("llama.cpp"):
        return "tab:orange"
    return "tab:blue" if row.get("weights", "dequant") == report.get("weights", "dequant") else "tab:cyan"


def write_report(report: dict, path_stem: str) -> list[str]:
    """``<stem>.json`` and ``<stem>.md`` (and ``<stem>.png`` with matplotlib), each
    written to a temporary file and renamed, so an interrupted run leaves no half file."""
    os.makedirs(os.path.dirname(path_stem) or ".", exist_ok=True)
    out = []
    for ext, text in ((".json", json.dumps(report, indent=2)),
                      (".md", report.get("header", "") + render_markdown(report) + "\n")):
        _atomic_write(path_stem + ext, text.encode())
        out.append(path_stem + ext)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return out
    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    labels = [f"{r['label']} [{_weights_cell(report, r.get('weights', 'dequant'), short=True)}]" for r in rows]
    ax.barh(labels[::-1], [r["tokens_per_s"] for r in rows][::-1],
            color=[_bar_color(report, r) for r in rows][::-1])
    t = report.get("temperature", 0)
    ax.set_xlabel(f"tokens/s ({f'temperature {t:g}' if t else 'greedy'}, batch 1)")
    ax.set_title("\n".join(textwrap.wrap(report.get("title", "fastverify compare"), 80)), fontsize=9)
    fig.tight_layout()
    tmp = path_stem + ".png.tmp"
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path_stem + ".png")
    out.append(path_stem + ".png")
    return out


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- memory and load time

MEMORY_KINDS = ("fastverify native", "fastverify fp32", "llama.cpp")
_MEMORY_MARK = "fastverify-memory: "

# Run in a fresh interpreter: the resident size after the imports (the baseline), after
# loading the model (timed) and after generating a few tokens (weights a lazy loader, such
# as llama.cpp's mmap, reads only when a step first touches them).
_MEMORY_SCRIPT = r"""
import json, sys, time

def rss():
    # VmRSS = RssAnon (allocated memory) + RssFile (mapped file pages) + RssShmem
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields

kind, source, threads, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
prompt = [1, 2, 3, 4]
if kind == "llama.cpp":
    import llama_cpp
    imported = rss()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=source, n_ctx=4096, n_threads=threads, n_threads_batch=threads, n_batch=512,
                          verbose=False)
    load_s = time.perf_counter() - t0
    loaded = rss()
    for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0)):
        if i + 1 >= new_tokens:
            break
else:
    import torch
    import fastverify.models
    from fastverify import cpu
    from fastverify.decoding import generate
    torch.set_num_threads(threads)
    cpu.available()   # the kernel library loaded (built, if its cache is cold) before the clock starts
    imported = rss()
    t0 = time.perf_counter()
    model = fastverify.models.load(source, weights="native" if kind.endswith("native") else "dequant")
    load_s = time.perf_counter() - t0
    loaded = rss()
    generate(model, [prompt], max_new_tokens=new_tokens)
generated = rss()
print("fastverify-memory: " + json.dumps({"load_s": load_s, "imported": imported, "loaded": loaded,
                                          "generated": generated}), flush=True)
"""


def measure_memory(source: str, threads: int, kinds=None, new_tokens: int = 4, timeout: float = 600.0) -> list[dict]:
    """Load time and resident memory of each engine on the model ``source`` (a .gguf file or
    a Hugging Face folder), each in a fresh ``python`` process with ``threads`` threads.

    ``kinds``: a subset of :data:`MEMORY_KINDS` (default: all three for a GGUF, "fastverify
    fp32" for a folder). Returns one dict per kind: ``load_s``; ``rss_imports``, ``rss_load``,
    ``rss_generate`` (bytes of VmRSS after the imports, after loading, after generating
    ``new_tokens`` tokens from a 4-token prompt); ``above_imports`` (rss_load - rss_imports);
    ``file_load`` (the growth of RssFile, mapped file pages, during the load). A process that
    fails gives ``{"kind", "error"}`` instead."""
    from .models.loaders import resolve_source

    path = resolve_source(source)
    gguf = str(path).endswith(".gguf")
    kinds = list(kinds) if kinds is not None else (list(MEMORY_KINDS) if gguf else ["fastverify fp32"])
    bad = [k for k in kinds if k not in MEMORY_KINDS]
    if bad:
        raise ValueError(f"kinds: {bad} not in {MEMORY_KINDS}")
    if not gguf and any(k != "fastverify fp32" for k in kinds):
        raise ValueError(f"kinds: native weights and llama.cpp need a .gguf source, got {source!r}")
    out = []
    for kind in kinds:
        proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, kind, str(path), str(threads), str(new_tokens)],
                              capture_output=True, text=True, timeout=timeout)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(_MEMORY_MARK)), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            out.append({"kind": kind, "error": tail[:300]})
            continue
        m = json.loads(line[len(_MEMORY_MARK):])
        out.append({"kind": kind, "load_s": m["load_s"], "rss_imports": m["imported"]["VmRSS"],
                    "rss_load": m["loaded"]["VmRSS"], "rss_generate": m["generated"]["VmRSS"],
                    "above_imports": m["loaded"]["VmRSS"] - m["imported"]["VmRSS"], "new_tokens": new_tokens,
                    "file_load": m["loaded"].get("RssFile", 0) - m["imported"].get("RssFile", 0)})
    return out
