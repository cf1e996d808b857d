"""Training drafters on the CPU from the target's own text: ``fastverify train-drafter``.

1. prompts: instructions built from text every Python install ships (the standard library's
   docstrings and source: summarise, explain, list, rewrite, rename a variable), plus
   :data:`fastverify.frspec.DEFAULT_PROMPTS`; the prompts of ``fastverify compare`` are left
   out, so evaluation never sees a training prompt;
2. data: the target answers them (greedy for two thirds, temperature 0.7 for the rest,
   chain/n-gram decoding, batched) and a second pass over prompt + answer records, per
   token, the states the drafter reads (EAGLE-3: the inputs of three target layers;
   Medusa: the final-norm state) and the final-norm state the target's head reads; shards
   under ``DIR/data`` make the step resumable;
3. training (:func:`train_eagle3`, :func:`train_medusa`): EAGLE-3 with training-time test
   — ``ttt_steps`` unrolled draft steps, step k reading step k − 1's own output as its
   feature, so the drafter learns from the states it will actually see when drafting deep
   — and a soft cross-entropy against the target's distribution over the draft vocabulary;
   Medusa with cross-entropy on the tokens 2, 3, … ahead. Checkpoints every few minutes
   (``DIR/train-state.pt``) make it resumable; the result is written in the format engines
   load (speculators / Medusa).
"""

from __future__ import annotations

import ast
import math
import os
import random
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F

from . import frspec
from .decoding.heads import KINDS
from .models import Step, chain_parents, cu_from_counts
from .models.quantized import weight_rows

_TEXT_TASKS = [
    "Summarize the following text in two sentences.\n\n{text}",
    "Explain the following text in simple words.\n\n{text}",
    "What is the main idea of this text? Answer in one paragraph.\n\n{text}",
    "List the key points of this text as bullet points.\n\n{text}",
    "Rewrite the following text so that it is shorter and clearer.\n\n{text}",
    "Write three questions a student could answer after reading this text.\n\n{text}",
    "Summarize this paragraph in one sentence.\n\n{text}",
    "List every technical term in this text, one per line.\n\n{text}",
]
_CODE_TASKS = [
    "Explain what this Python function does.\n\n```python\n{code}\n```",
    "Add comments to this Python function and return the whole function.\n\n```python\n{code}\n```",
    "Rename the variable `{old}` to `{new}` in this Python function and return the whole function.\n\n"
    "```python\n{code}\n```",
    "Write a docstring for this Python function.\n\n```python\n{code}\n```",
    "Is there a bug in this Python function? Explain.\n\n```python\n{code}\n```",
]


def _stdlib_functions(limit_lines: int = 18) -> list[tuple[str, list[str]]]:
    """Short functions of the standard library: (source, names it assigns)."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                source = f.read()
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and 4 <= node.end_lineno - node.lineno + 1 <= limit_lines:
                code = ast.get_source_segment(source, node)
                if code is None or node.col_offset:
                    continue
                stored = sorted({n.id for n in ast.walk(node) if isinstance(n, ast.Name)
                                 and isinstance(n.ctx, ast.Store) and len(n.id) > 2})
                out.append((code, stored))
    return out


def training_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` training prompts (see the module docstring), none of them a compare prompt."""
    from .compare import PROMPTS

    rng = random.Random(seed)
    paragraphs = [p.strip() for doc in frspec.builtin_corpus() for p in doc.split("\n\n")
                  if 200 <= len(p.strip()) <= 900]
    functions = _stdlib_functions()
    excluded = {p.strip() for p in PROMPTS.values()}
    paragraphs = [p for p in paragraphs if not any(p in e for e in excluded)]
    prompts = [p for p in frspec.DEFAULT_PROMPTS if p.strip() not in excluded]
    while len(prompts) < n:
        if rng.random() < 0.6 and paragraphs:
            prompts.append(rng.choice(_TEXT_TASKS).format(text=rng.choice(paragraphs)))
        elif functions:
            code, stored = rng.choice(functions)
            task = rng.choice(_CODE_TASKS)
            if "{old}" in task:
                if not stored:
                    continue
                old = rng.choice(stored)
                task = task.replace("{old}", old).replace("{new}", rng.choice(["new_" + old, old + "_value", "result"]))
            prompts.append(task.format(code=code))
    prompts = [p for p in prompts if p.strip() not in excluded]
    rng.shuffle(prompts)
    return prompts[:n]


@torch.no_grad()
def self_instruct_prompts(model, n: int, *, seed: int = 0, batch_size: int = 32, progress: bool = True) -> list[str]:
    """``n`` prompts the target writes itself (Magpie-style self-instruction): the chat
    template up to the user's turn, continued at temperature 1 until the turn ends — the
    everyday requests an instruct model was tuned on, which the library's technical text
    lacks. Compare prompts are left out like everywhere else."""
    from .compare import PROMPTS
    from .decoding import generate

    tok = model.tokenizer
    if tok is None or not tok.has_chat_template:
        return []
    marker = "\u2063"
    prefix = tok.apply_chat_template(marker).split(marker)[0]        # system turn + "<user turn start>"
    ids = tok.encode(prefix, add_bos=False)
    excluded = {p.strip() for p in PROMPTS.values()}
    out: list[str] = []
    bar = _progress(n, "self-instruct prompts", "prompt", progress)
    start = 0
    while len(out) < n:
        r = generate(model, [ids] * batch_size, max_new_tokens=64, temperature=1.0, top_p=0.95, chat=False,
                     seed=list(range(seed + start, seed + start + batch_size)))
        start += batch_size
        for text in r.texts:
            text = text.strip()
            if 15 <= len(text) <= 400 and text not in excluded and text not in out and len(out) < n:
                out.append(text)
                bar.update(1)
    bar.close()
    return out


# --------------------------------------------------------------------------- data


def _progress(total, desc: str, unit: str = "it", enabled: bool = True):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1)


@torch.no_grad()
def answer_prompts(model, prompts: list[str], *, max_new_tokens: int = 256, batch_size: int = 8, seed: int = 0,
                   greedy_share: float = 2 / 3, progress: bool = True) -> list[dict]:
    """The target's answers: ``[{"ids": prompt + answer, "prompt_len": n, "temperature": T}]``."""
    from .decoding import encode_prompts, generate

    out = []
    bar = _progress(len(prompts), "answer prompts", "prompt", progress)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        ids = [p[:1024] for p in encode_prompts(model, batch)]
        temps = [0.0 if (start + i) % 3 < round(3 * greedy_share) else 0.7 for i in range(len(batch))]
        r = generate(model, ids, method="chain", drafter="ngram", max_new_tokens=max_new_tokens,
                     temperature=temps, seed=seed + start)
        for p, t, T in zip(ids, r.tokens, temps):
            out.append({"ids": p + t, "prompt_len": len(p), "temperature": T})
        bar.update(len(batch))
    bar.close()
    return out


@torch.no_grad()
def target_states(model, ids: list[int], capture: tuple[int, ...], chunk: int = 512):
    """One pass of the target over ``ids`` [L]: (h [L, d] final-norm states, feats [L, len(capture)·d])."""
    dev = model.device
    cache = model.new_cache(1, len(ids) + 1)
    hs, fs = [], []
    for start in range(0, len(ids), chunk):
        piece = ids[start:start + chunk]
        cu = cu_from_counts([len(piece)], dev)
        step = Step.build(cache, torch.zeros(1, dtype=torch.long, device=dev), chain_parents(cu), cu,
                          torch.tensor([start], dtype=torch.int32, device=dev))
        h, f = model.hidden(torch.tensor(piece, device=dev), step, cache, capture=capture)
        hs.append(h)
        fs.append(f)
    return torch.cat(hs), torch.cat(fs)


def default_aux_layers(model) -> tuple[int, ...]:
    """The target layers EAGLE-3 reads of ``model`` (:func:`fastverify.models.eagle3.default_aux_layers`)."""
    from .models.eagle3 import default_aux_layers as aux_layers

    return aux_layers(model.config.n_layers)


def build_data(model, folder: str, *, samples: int = 1600, self_instruct: int = 0, max_new_tokens: int = 256,
               batch_size: int = 16, shard: int = 64, seed: int = 0, progress: bool = True) -> list[str]:
    """Generate (or reuse) the training data under ``folder``: shards ``data-XXXX.pt`` of
    ``shard`` samples, each ``{"ids", "prompt_len", "h" fp16 [L, d], "aux" fp16 [L, 3d]}``,
    for ``samples`` prompts of :func:`training_prompts`, then shards ``self-XXXX.pt`` for
    ``self_instruct`` prompts of :func:`self_instruct_prompts` (kept in
    ``self-instruct.json``). Shards that exist are kept, so an interrupted run resumes."""
    import json

    os.makedirs(folder, exist_ok=True)
    paths = _build_shards(model, folder, "data", training_prompts(samples, seed), max_new_tokens=max_new_tokens,
                          batch_size=batch_size, shard=shard, seed=seed, progress=progress)
    if self_instruct:
        listing = os.path.join(folder, "self-instruct.json")
        if os.path.exists(listing):
            with open(listing, encoding="utf-8") as f:
                prompts = json.load(f)
        else:
            prompts = self_instruct_prompts(model, self_instruct, seed=seed, progress=progress)
            with open(listing, "w", encoding="utf-8") as f:
                json.dump(prompts, f, indent=0)
        paths += _build_shards(model, folder, "self", prompts[:self_instruct], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, shard=shard, seed=seed + 1, progress=progress)
    return paths


def _build_shards(model, folder: str, stem: str, prompts: list[str], *, max_new_tokens: int, batch_size: int,
                  shard: int, seed: int, progress: bool) -> list[str]:
    aux_layers = default_aux_layers(model)
    samples = len(prompts)
    paths = []
    n_shards = -(-samples // shard)
    bar = _progress(n_shards, f"training data ({stem})", "shard", progress)
    for s in range(n_shards):
        path = os.path.join(folder, f"{stem}-{s:04d}.pt")
        paths.append(path)
        if not os.path.exists(path):
            answers = answer_prompts(model, prompts[s * shard:(s + 1) * shard], max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, seed=seed + 7919 * s, progress=False)
            for a in answers:
                h, f = target_states(model, a["ids"], aux_layers)
                a["h"], a["aux"] = h.half(), f.half()
            torch.save({"samples": answers, "aux_layers": aux_layers}, path + ".tmp")
            os.replace(path + ".tmp", path)
        bar.update(1)
    bar.close()
    return paths


def load_data(paths: list[str]) -> list[dict]:
    out = []
    for p in paths:
        out += torch.load(p, weights_only=False)["samples"]
    return out


# --------------------------------------------------------------------------- EAGLE-3


def draft_vocabulary(samples: list[dict], size: int, vocab_size: int, always=()) -> torch.Tensor:
    """The ``size`` target ids most frequent in the answers (``always`` included), ascending
    — EAGLE-3's draft vocabulary (``d2t``): what the drafter can propose."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for s in samples:
        counts.index_add_(0, torch.tensor(s["ids"][s["prompt_len"]:], dtype=torch.long),
                          torch.ones(len(s["ids"]) - s["prompt_len"], dtype=torch.float64))
        counts.index_add_(0, torch.tensor(s["ids"][:s["prompt_len"]], dtype=torch.long),
                          torch.full((s["prompt_len"],), 0.1, dtype=torch.float64))
    for t in always:
        counts[t] = float("inf")
    return counts.topk(size).indices.sort().values


def _ttt_mask(L: int, steps: int, device) -> torch.Tensor:
    """[L, steps · L] bool: unrolled step ``steps − 1`` at base row t attends to step 0's rows
    ≤ t (the context, drafted from the target's states) and to row t of every later step
    (its own draft path) — the keys a draft node sees at inference."""
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    diag = torch.eye(L, dtype=torch.bool, device=device)
    return torch.cat([causal] + [diag] * (steps - 1), 1)


def _batch(samples: list[dict], device) -> dict:
    """Pad ``samples`` to [B, L]: ids, aux, h, prompt_len."""
    L = max(len(s["ids"]) for s in samples)
    B = len(samples)
    ids = torch.zeros(B, L, dtype=torch.long)
    aux = torch.zeros(B, L, samples[0]["aux"].shape[1])
    h = torch.zeros(B, L, samples[0]["h"].shape[1])
    n = torch.zeros(B, dtype=torch.long)
    for i, s in enumerate(samples):
        m = len(s["ids"])
        ids[i, :m] = torch.tensor(s["ids"])
        aux[i, :m], h[i, :m], n[i] = s["aux"].float(), s["h"].float(), m
    prompt_len = torch.tensor([s["prompt_len"] for s in samples])
    return {k: v.to(device) for k, v in dict(ids=ids, aux=aux, h=h, lengths=n, prompt_len=prompt_len).items()}


def unrolled_steps(drafter, ids: torch.Tensor, aux: torch.Tensor, steps: int):
    """Training-time test: the drafter's outputs y_k [B, L − 1, d] for k = 0 … steps − 1 over
    whole sequences ``ids [B, L]`` with the target's states ``aux [B, L, n_aux · d_t]``.

    Base row t of step k reads token ids[t+1+k] at position t + k and, as its feature,
    fc(aux[t]) at step 0 or step k − 1's output at row t; it attends to step 0's rows ≤ t
    and to row t of steps 1 … k (:func:`_ttt_mask`): exactly the drafter at depth k + 1 of
    a draft after t + 1 context entries."""
    B, L = ids.shape
    Lb = L - 1
    t = torch.arange(Lb, device=ids.device)
    g = drafter.fuse(aux[:, :Lb])
    layer = drafter.layers[0]
    past, ys = [], []
    for k in range(steps):
        cos, sin = drafter.rope(t + k)
        src = (t + 1 + k).clamp(max=L - 1)
        y, kv = layer.forward_dense(drafter.embed(ids[:, src]), g, cos, sin, past, _ttt_mask(Lb, k + 1, ids.device))
        past.append(kv)
        ys.append(y)
        g = drafter.next_feature(y)
    return ys


def eagle3_loss(drafter, target_rows: torch.Tensor, batch: dict, *, ttt_steps: int = 3, prompt_weight: float = 0.3,
                step_decay: float = 0.8):
    """The EAGLE-3 objective over a padded batch: the outputs of :func:`unrolled_steps`
    (base row t of step k predicts the token after ids[t+1+k]) are trained to match the
    target's distribution there, softmax(W_d · h[t+1+k]) over the draft vocabulary
    (``target_rows`` W_d [Vd, d]), by soft cross-entropy. Rows predicting a prompt token
    weigh ``prompt_weight``; step k's loss weighs ``step_decay^k``.
    Returns (loss, [top-1 agreement with the target per step])."""
    ids, aux, h, lengths, prompt_len = (batch[k] for k in ("ids", "aux", "h", "lengths", "prompt_len"))
    L = ids.shape[1]
    t = torch.arange(L - 1, device=ids.device)
    total, accs = 0.0, []
    for k, y in enumerate(unrolled_steps(drafter, ids, aux, ttt_steps)):
        src = (t + 1 + k).clamp(max=L - 1)
        valid = (t[None, :] + 1 + k) < lengths[:, None]                      # [B, L − 1]
        if not bool(valid.any()):
            break
        weight = torch.where(t[None, :] + 2 + k >= prompt_len[:, None], 1.0, prompt_weight) * valid
        logq = F.log_softmax(drafter.lm_head(drafter.head_input(y)).float(), -1)      # [B, L − 1, Vd]
        with torch.no_grad():
            p = torch.softmax(h[:, src] @ target_rows.t(), -1)
        ce = -(p * logq).sum(-1)
        total = total + step_decay ** k * (ce * weight).sum() / weight.sum().clamp(min=1e-6)
        with torch.no_grad():
            full = valid & (weight == 1.0)
            hit = (logq.argmax(-1) == p.argmax(-1)) & full
            accs.append(float(hit.sum()) / max(1, int(full.sum())))
    return total, accs


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


def _batches(samples: list[dict], batch_tokens: int, rng: random.Random) -> list[list[dict]]:
    """Samples grouped by length into batches of about ``batch_tokens`` padded tokens, shuffled."""
    order = sorted(samples, key=lambda s: len(s["ids"]))
    out, cur = [], []
    for s in order:
        if cur and (len(cur) + 1) * len(s["ids"]) > batch_tokens:
            out.append(cur)
            cur = []
        cur.append(s)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def train_loop(module, params, loss_fn, samples: list[dict], out: str, *, steps: int, lr: float,
               batch_tokens: int, seed: int, progress: bool, desc: str, save_every_s: float = 300.0, log=None):
    """Adam over ``params`` for ``steps`` batches (cycling through ``samples``); resumes from
    and saves ``out/train-state.pt`` every ``save_every_s`` seconds. ``loss_fn(batch) ->
    (loss, accuracies)``. Returns the history of (step, loss, accuracies)."""
    os.makedirs(out, exist_ok=True)
    state_path = os.path.join(out, "train-state.pt")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    start, history = 0, []
    if os.path.exists(state_path):
        state = torch.load(state_path, weights_only=False)
        module.load_state_dict(state["module"], strict=False)
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
    rng = random.Random(seed)
    batches = []
    bar = _progress(steps, desc, "step", progress)
    bar.update(start)
    last_save = time.time()
    for step in range(steps):
        if not batches:
            batches = _batches(samples, batch_tokens, rng)
        batch = batches.pop()
        if step < start:
            continue                        # replay the data order of the run being resumed
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup=max(1, steps // 20))
        loss, accs = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append((step, float(loss.detach()), accs))
        recent = history[-20:]
        mean_acc = [sum(a[i] for _, _, a in recent if len(a) > i) / max(1, sum(len(a) > i for _, _, a in recent))
                    for i in range(max(len(a) for _, _, a in recent))]
        bar.set_postfix(loss=f"{sum(l for _, l, _ in recent) / len(recent):.3f}",
                        acc="/".join(f"{a:.2f}" for a in mean_acc))
        bar.update(1)
        if log is not None and step % 50 == 0:
            log(f"step {step} loss {float(loss):.4f} acc {[round(a, 3) for a in accs]}")
        if time.time() - last_save > save_every_s or step + 1 == steps:
            torch.save({"module": module.state_dict(), "optimizer": opt.state_dict(), "step": step + 1,
                        "history": history}, state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)
            last_save = time.time()
    bar.close()
    return history


def _split(samples: list[dict], eval_share: float = 0.05):
    """(train, held-out) samples: every 1 / eval_share-th sample is held out."""
    every = max(2, round(1 / eval_share))
    return ([s for i, s in enumerate(samples) if i % every], [s for i, s in enumerate(samples) if not i % every])


@torch.no_grad()
def _evaluate(loss_fn, samples: list[dict], batch_tokens: int) -> tuple[float, list[float]]:
    """Mean loss and per-step top-1 agreement over ``samples``."""
    losses, accs = [], []
    for batch in _batches(samples, batch_tokens, random.Random(0)):
        loss, acc = loss_fn(batch)
        losses.append(float(loss))
        accs.append(acc)
    n = max(len(a) for a in accs)
    return (sum(losses) / len(losses),
            [sum(a[i] for a in accs if len(a) > i) / max(1, sum(len(a) > i for a in accs)) for i in range(n)])


def train_eagle3(model, samples: list[dict], out: str, *, steps: int = 1200, lr: float = 1e-3, ttt_steps: int = 3,
                 draft_vocab: int = 4096, batch_tokens: int = 2048, seed: int = 0, progress: bool = True,
                 verifier: str | None = None, init: str | None = None, log=None) -> dict:
    """Train an EAGLE-3 drafter for ``model`` on ``samples`` (:func:`build_data`) and write it
    to ``out`` in the speculators format. ``init``: start from that trained drafter (its
    weights; the head's rows of tokens both vocabularies hold, the target's rows for the
    others) instead of the fresh initialisation. Returns a summary (held-out loss / agreement)."""
    from .models.eagle3 import Eagle3, load_eagle3, save_eagle3

    train, held_out = _split(samples)
    eos = list(model.config.eos_ids)
    vocab = draft_vocabulary(train, draft_vocab, model.config.vocab_size, always=eos)
    drafter = Eagle3.for_target(model, token_map=vocab, verifier=verifier, seed=seed)
    if init is not None:
        _warm_start(drafter, load_eagle3(init))
    target_rows = weight_rows(model.lm_head, vocab).contiguous()                # [Vd, d]
    params = [p for n, p in drafter.named_parameters() if not n.startswith("embed_tokens.")]
    dev = model.device

    def loss_fn(batch):
        return eagle3_loss(drafter, target_rows, _batch(batch, dev), ttt_steps=ttt_steps)

    drafter.train()
    history = train_loop(drafter, params, loss_fn, train, out, steps=steps, lr=lr, batch_tokens=batch_tokens,
                         seed=seed, progress=progress, desc="train eagle3", log=log)
    drafter.eval()
    loss, acc = _evaluate(loss_fn, held_out, batch_tokens)
    coverage = _coverage(held_out, vocab)
    save_eagle3(drafter.requires_grad_(False), out)
    return {"kind": "eagle3", "steps": steps, "held_out_loss": loss, "held_out_agreement": acc,
            "draft_vocab": draft_vocab, "answer_coverage": coverage, "train_samples": len(train),
            "held_out_samples": len(held_out), "first_train_loss": history[0][1] if history else None,
            "final_train_loss": history[-1][1] if history else None}


@torch.no_grad()
def _warm_start(drafter, trained) -> None:
    """Copy ``trained``'s weights into ``drafter`` (same shapes), its head rows by target id."""
    own = dict(drafter.named_parameters())
    for name, p in trained.named_parameters():
        if name != "lm_head.weight" and name in own:
            own[name].copy_(p.float())
    row_of = {int(t): i for i, t in enumerate(trained.token_map)}
    for j, t in enumerate(drafter.token_map.tolist()):
        if t in row_of:
            drafter.lm_head.weight[j] = trained.lm_head.weight[row_of[t]].float()


def _coverage(samples: list[dict], vocab: torch.Tensor) -> float:
    """Share of answer tokens inside the draft vocabulary."""
    answers = torch.tensor([t for s in samples for t in s["ids"][s["prompt_len"]:]], dtype=torch.long)
    return float(torch.isin(answers, vocab).float().mean()) if len(answers) else 0.0


def train_medusa(model, samples: list[dict], out: str, *, steps: int = 1000, lr: float = 1e-3, num_heads: int = 4,
                 draft_vocab: int = 4096, batch_tokens: int = 4096, seed: int = 0, progress: bool = True,
                 verifier: str | None = None, log=None) -> dict:
    """Train shared-head Medusa heads for ``model`` (projecting through its LM head rows of
    the ``draft_vocab`` most frequent answer tokens) and write them in the Medusa layout."""
    from .models.medusa import Medusa, MedusaConfig, medusa_loss, save_medusa

    train, held_out = _split(samples)
    vocab = draft_vocabulary(train, draft_vocab, model.config.vocab_size, always=list(model.config.eos_ids))
    d = model.config.dim
    medusa = Medusa(MedusaConfig(hidden_size=d, vocab_size=model.config.vocab_size, num_heads=num_heads,
                                 num_layers=1, shared_head=True, base_model_name_or_path=verifier), token_map=vocab)
    with torch.no_grad():   # zero blocks: every head starts as the target's own head (Medusa's initialisation)
        for p in medusa.parameters():
            p.zero_()
    head = weight_rows(model.lm_head, vocab).contiguous()

    def loss_fn(batch):
        total, accs = 0.0, []
        for s in batch:
            tokens = torch.tensor(s["ids"])
            mask = torch.arange(len(tokens)) >= s["prompt_len"] - 1
            loss, acc = medusa_loss(medusa, s["h"].float(), tokens, head, mask=mask, token_map=vocab)
            total = total + loss / len(batch)
            accs.append(acc)
        return total, [sum(a[i] for a in accs if a[i] == a[i]) / max(1, sum(a[i] == a[i] for a in accs))
                       for i in range(num_heads)]

    medusa.train()
    history = train_loop(medusa, list(medusa.parameters()), loss_fn, train, out, steps=steps, lr=lr,
                         batch_tokens=batch_tokens, seed=seed, progress=progress, desc="train medusa", log=log)
    medusa.eval()
    loss, acc = _evaluate(loss_fn, held_out, batch_tokens)
    save_medusa(medusa.requires_grad_(False), out)
    return {"kind": "medusa", "steps": steps, "held_out_loss": loss, "held_out_accuracy": acc,
            "draft_vocab": draft_vocab, "train_samples": len(train), "held_out_samples": len(held_out),
            "first_train_loss": history[0][1] if history else None,
            "final_train_loss": history[-1][1] if history else None}


def train_drafter(model, kind: str, out: str, *, samples: int = 1600, self_instruct: int = 0,
                  steps: int | None = None, data_dir: str | None = None, progress: bool = True, log=None,
                  **kw) -> dict:
    """``fastverify train-drafter``: data (:func:`build_data`, under ``data_dir`` or
    ``out/data``), then :func:`train_eagle3` or :func:`train_medusa`; writes ``out/training.json``."""
    import json

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    paths = build_data(model, data_dir or os.path.join(out, "data"), samples=samples, self_instruct=self_instruct,
                       progress=progress)
    data = load_data(paths)
    t1 = time.time()
    train = train_eagle3 if kind == "eagle3" else train_medusa
    if steps is not None:
        kw["steps"] = steps
    summary = train(model, data, out, progress=progress, log=log, **kw)
    summary.update(data_seconds=t1 - t0, train_seconds=time.time() - t1, samples=samples, self_instruct=self_instruct,
                   tokens=sum(len(s["ids"]) for s in data), threads=torch.get_num_threads())
    with open(os.path.join(out, "training.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary
