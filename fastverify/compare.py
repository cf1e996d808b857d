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
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .decoding import encode_prompts, generate
from .models import unfuse_hf

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
]
QUICK_RULE_METHODS = ["ar", "chain/layerskip token", "chain/layerskip block", "paths/layerskip block"]
HF_METHODS = ["hf", "hf/prompt-lookup", "hf/early-exit"]
LLAMA_CPP_METHODS = ["llama.cpp", "llama.cpp/prompt-lookup"]
# --quick: the baseline, the best n-gram method on CPU, and the references' plain and prompt-lookup runs
QUICK_METHODS = ["ar", "chain/ngram"]
QUICK_HF_METHODS = ["hf", "hf/prompt-lookup"]
REFERENCE_PREFIXES = ("hf", "llama.cpp")


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


def run(model, *, prompts: dict[str, str] | None = None, methods=None, hf_methods=None, llama_methods=None,
        max_new_tokens: int = 64, tie_tolerance: float = 1e-3, options: dict | None = None,
        progress_bar: bool = True, temperature: float = 0.0, seed: int = 0) -> dict:
    """Run every method on every prompt (greedy, or sampled at ``temperature``; batch 1),
    streaming a line per run under a progress bar; returns the report dict."""
    prompts = prompts or PROMPTS
    methods = methods if methods is not None else METHODS
    hf_methods = hf_methods if hf_methods is not None else HF_METHODS
    options = options or {}
    ids = {name: encode_prompts(model, [text])[0] for name, text in prompts.items()}
    eos = sorted(model.config.eos_ids)
    rows: dict[str, Row] = {}
    base: dict[str, list[int]] = {}
    llama_methods = list(llama_methods or [])
    total = len(prompts) * (len(methods) + len(hf_methods) + len(llama_methods))
    bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True, disable=not progress_bar)

    def progress(label, name, tokens, seconds):
        bar.update(1)
        bar.write(f"{label:<24} {name:<10} {tokens:>4} tokens {tokens / seconds:6.1f} tok/s")

    generate(model, [ids[next(iter(ids))]], max_new_tokens=4)   # warm up kernels and allocator
    for label, method, drafter, *extra in methods:   # extra: options of this method only
        row = rows.setdefault(label, Row(label))
        for name, prompt in ids.items():
            r = generate(model, [prompt], method=method, drafter=drafter, max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed, **{**options, **(extra[0] if extra else {})})
            s = r.stats
            row.tokens += s.new_tokens
            row.seconds += s.seconds
            row.per_prompt[name] = [s.new_tokens, s.seconds]
            row.steps += s.steps
            row.accepted += sum(s.accepted[0])
            for k in ("draft_s", "verify_s", "sample_s", "prefill_s"):
                setattr(row, k, getattr(row, k) + getattr(s, k))
            if temperature == 0:
                _check(model, row, name, prompt, base, r.tokens[0], tie_tolerance)
            progress(label, name, s.new_tokens, s.seconds)
    if hf_methods:
        hf = hf_twin(model)
        early_exit = max(1, model.config.n_layers // 2)
        with torch.no_grad():
            _hf_generate(hf, ids[next(iter(ids))], "hf", 4, eos, early_exit)
            for kind in hf_methods:
                row = rows.setdefault(kind, Row(kind))
                for name, prompt in ids.items():
                    out, seconds = _hf_generate(hf, prompt, kind, max_new_tokens, eos, early_exit, temperature)
                    row.tokens += len(out)
                    row.seconds += seconds
                    row.per_prompt[name] = [len(out), seconds]
                    if temperature == 0:
                        _check(model, row, name, prompt, base, out, tie_tolerance)
                    progress(kind, name, len(out), seconds)
    for kind in llama_methods:
        llm = llama_cpp_model(model, torch.get_num_threads(), prompt_lookup=kind.endswith("prompt-lookup"))
        _llama_cpp_generate(llm, ids[next(iter(ids))], 4, eos)                # warm up
        row = rows.setdefault(kind, Row(kind))
        for name, prompt in ids.items():
            out, seconds = _llama_cpp_generate(llm, prompt, max_new_tokens, eos, temperature)
            row.tokens += len(out)
            row.seconds += seconds
            row.per_prompt[name] = [len(out), seconds]
            if temperature == 0:
                _check(model, row, name, prompt, base, out, tie_tolerance)
            progress(kind, name, len(out), seconds)
        del llm
    bar.close()
    return {"rows": [dict(asdict(r), tokens_per_s=r.tokens_per_s, tokens_per_step=r.tokens_per_step)
                     for r in rows.values()],
            "prompts": {k: len(v) for k, v in ids.items()}, "max_new_tokens": max_new_tokens,
            "tie_tolerance": tie_tolerance, "threads": torch.get_num_threads(), "dtype": str(model.dtype),
            "temperature": temperature, "seed": seed}


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


def render_markdown(report: dict) -> str:
    rows = report["rows"]
    hf = next((r for r in rows if r["label"] == "hf"), None)
    ar = rows[0]
    n = len(report["prompts"])
    sampled = report.get("temperature", 0) > 0
    lines = [
        "| method | tokens/s | tokens per target forward | vs transformers generate | vs fastverify ar "
        "| draft / verify / sample share | " + ("output law |" if sampled else "same tokens as ar |"),
        "|---|---:|---:|---:|---:|---|---|",
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
            same += " (its own quantized weights: not expected to match)"
        elif r["divergences"]:
            same += f" — {len(r['divergences'])} DIVERGED"
        if sampled:
            same = ("LOSSY (typical acceptance)" if lossy(r["label"]) else
                    "its own sampler" if r["label"].startswith(REFERENCE_PREFIXES) else "the target's (lossless)")
        lines.append(f"| {r['label']} | {tps:.1f} | {tau} | {vs_hf} | {vs_ar} | {shares} | {same} |")
    names = list(report["prompts"])
    lines += ["", "tokens/s per prompt:", "", "| method | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
    for r in rows:
        cells = [f"{t / sec:.1f}" if sec else "–" for t, sec in (r["per_prompt"].get(n, (0, 0)) for n in names)]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    for note in report.get("notes", []):
        lines += ["", note]
    return "\n".join(lines + ["", winner(report)])


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
    labels = [r["label"] for r in rows]
    ax.barh(labels[::-1], [r["tokens_per_s"] for r in rows][::-1],
            color=["tab:gray" if lab.startswith("hf") else "tab:orange" if lab.startswith("llama.cpp") else "tab:blue"
                   for lab in labels][::-1])
    t = report.get("temperature", 0)
    ax.set_xlabel(f"tokens/s ({f'temperature {t:g}' if t else 'greedy'}, batch 1)")
    ax.set_title(report.get("title", "fastverify compare"), fontsize=9)
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
