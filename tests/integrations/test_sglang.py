"""fastverify.integrations.sglang against sgl-kernel 0.3.21.

- The peers' own cases with their expected values: sgl-kernel
  ``tests/speculative/test_eagle_utils.py::test_verify_tree_greedy``,
  ``tests/speculative/test_speculative_sampling.py::test_tree_speculative_sampling_target_only``
  (both threshold cases) and sglang's ``build_eagle_tree.py::test_build_tree_kernel_efficient``
  (also ``test/srt/test_build_eagle_tree.py``), the latter on every backend of
  fastverify.build_tree and in every tree-mask mode.
- Plain-Python oracles that transliterate the CUDA kernels (one thread per request, loops
  and early exits as in ``eagle_utils.cu`` / ``speculative_sampling.cuh``) on random trees.
- Goodness of fit: with thresholds 1 every emitted token follows the target distribution.
- No host reads on the hot path; bad input names the argument; both argument spellings.
"""

import inspect
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from conftest import BACKEND_DEVICES

import fastverify
from fastverify.integrations import sglang
from fastverify.integrations.sglang import (TreeMaskMode, build_tree_kernel_efficient,
                                            tree_speculative_sampling_target_only, verify_tree_greedy)

pytestmark = pytest.mark.family("integrations")

BACKENDS = list(BACKEND_DEVICES)
I32 = torch.int32

# ----------------------------------------------------------------------------- the peers' cases


def peer_tree():
    """The tree, tokens and target logits shared by test_eagle_utils.py and
    test_speculative_sampling.py (two requests, six nodes each)."""
    candidates = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]])
    retrive_index = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])
    retrive_next_token = torch.tensor([[1, 2, -1, 4, 5, -1], [4, 2, 3, -1, 5, -1]])
    retrive_next_sibling = torch.tensor([[-1, 3, -1, -1, -1, -1], [-1, -1, -1, -1, 1, -1]])
    logits = torch.full((2, 6, 20), 1.0)
    logits[0, 0, 3] = logits[0, 3, 4] = logits[0, 4, 5] = 10
    logits[1, 0, 11] = logits[1, 4, 12] = 10
    for i in range(2):
        for j in range(6):
            if logits[i, j].max() < 10:
                logits[i, j, 18] = 10
    return candidates, retrive_index, retrive_next_token, retrive_next_sibling, logits


def outputs(B, K, P):
    return (torch.full((P,), -1, dtype=I32), torch.full((B, K), -1, dtype=I32), torch.zeros(B, dtype=I32))


@pytest.mark.parametrize("spelling", ["retrive", "retrieve"])
def test_verify_tree_greedy(spelling):
    cand, ri, nt, ns, logits = peer_tree()
    predicts, accept_index, accept_token_num = outputs(2, 4, 12)
    verify_tree_greedy(predicts=predicts, accept_index=accept_index, accept_token_num=accept_token_num,
                       candidates=cand, target_predict=torch.argmax(logits, -1),
                       **{f"{spelling}_index": ri, f"{spelling}_next_token": nt, f"{spelling}_next_sibling": ns})
    assert predicts.tolist() == [3, -1, -1, 4, 5, 18, 11, -1, -1, -1, 12, 18]
    assert accept_index.tolist() == [[0, 3, 4, 5], [6, 10, 11, -1]]
    assert accept_token_num.tolist() == [3, 2]


SAMPLING_CASES = [  # threshold_single, threshold_acc, predicts, accept_index, accept_token_num
    (1, 1, [3, -1, -1, 4, 5, 18, 11, -1, -1, -1, 12, 18], [[0, 3, 4, 5], [6, 10, 11, -1]], [3, 2]),
    (0, 0, [1, 2, 18, -1, -1, -1, 11, -1, -1, -1, 12, 18], [[0, 1, 2, -1], [6, 10, 11, -1]], [2, 2]),
]


@pytest.mark.parametrize("spelling", ["retrive", "retrieve"])
@pytest.mark.parametrize("threshold_single, threshold_acc, expected_predicts, expected_accept_index, "
                         "expected_accept_token_num", SAMPLING_CASES)
def test_tree_speculative_sampling_target_only(threshold_single, threshold_acc, expected_predicts,
                                               expected_accept_index, expected_accept_token_num, spelling):
    cand, ri, nt, ns, logits = peer_tree()
    bs, num_draft_tokens = cand.shape
    predicts, accept_index, accept_token_num = outputs(bs, len(expected_accept_index[0]), len(expected_predicts))
    target_probs = F.softmax(logits / torch.tensor([0.01, 0.01])[:, None, None], dim=-1)
    draft_probs = torch.zeros_like(target_probs)
    gen = torch.Generator().manual_seed(0)
    tree_speculative_sampling_target_only(
        predicts=predicts, accept_index=accept_index, accept_token_num=accept_token_num, candidates=cand,
        uniform_samples=torch.rand(bs, num_draft_tokens, generator=gen),
        uniform_samples_for_final_sampling=torch.rand(bs, generator=gen), target_probs=target_probs,
        draft_probs=draft_probs, threshold_single=threshold_single, threshold_acc=threshold_acc, deterministic=True,
        **{f"{spelling}_index": ri, f"{spelling}_next_token": nt, f"{spelling}_next_sibling": ns})
    assert predicts.tolist() == expected_predicts
    assert accept_index.tolist() == expected_accept_index
    assert accept_token_num.tolist() == expected_accept_token_num


def peer_build_inputs():
    """sglang's build_eagle_tree.py case: the draft's score / parent lists of a 4-step top-4
    expansion for two requests, reduced to (parent_list, selected_index) by sglang's own
    preprocessing (top num_verify_tokens - 1 scores, sorted)."""
    # [step][request][parent][child]: the draft's top-4 scores at each expansion step
    steps = [
        [[[7.1127e-01, 2.8292e-01, 2.2995e-03, 1.7357e-03]],
         [[9.7476e-01, 2.2219e-02, 6.5031e-04, 1.3212e-04]]],
        [[[6.9142e-01, 1.2863e-02, 1.6873e-03, 1.1871e-03],
          [2.4787e-01, 1.8818e-02, 1.4204e-02, 9.2235e-04],
          [2.2971e-03, 1.6700e-06, 1.8737e-07, 8.3146e-08],
          [1.2771e-03, 2.4374e-04, 1.7832e-04, 1.1947e-05]],
         [[8.4832e-02, 6.6068e-02, 5.8304e-02, 5.7851e-02],
          [2.3616e-03, 1.1243e-03, 5.4368e-04, 2.7768e-04],
          [2.5286e-04, 1.5578e-04, 2.8817e-05, 1.2888e-05],
          [1.2834e-04, 2.5417e-06, 1.1279e-06, 1.6088e-08]]],
        [[[6.6438e-01, 2.6997e-02, 2.4236e-05, 4.0821e-06],
          [2.4402e-01, 2.8409e-03, 5.0935e-04, 2.9022e-04],
          [1.6178e-02, 2.0567e-03, 4.5892e-04, 3.0034e-05],
          [1.3023e-02, 5.0497e-04, 3.6371e-04, 8.7750e-05]],
         [[2.3263e-02, 2.0054e-02, 9.3990e-03, 2.7783e-03],
          [6.4156e-02, 5.5506e-04, 1.0429e-04, 9.7211e-05],
          [4.9950e-02, 5.0630e-03, 9.0068e-04, 3.3656e-04],
          [7.5817e-03, 8.5731e-04, 6.9972e-04, 6.0793e-04]]],
        [[[6.6420e-01, 1.0525e-04, 6.5864e-05, 1.2253e-06],
          [1.3019e-01, 1.0461e-01, 5.2083e-03, 1.6777e-03],
          [2.0103e-02, 6.7335e-03, 1.2625e-04, 1.0364e-05],
          [1.5142e-02, 7.0819e-04, 9.6595e-05, 8.7951e-05]],
         [[5.8608e-02, 1.8840e-03, 7.8535e-04, 4.4400e-04],
          [1.2185e-02, 2.0684e-03, 1.7418e-03, 1.4327e-03],
          [6.2455e-03, 6.1487e-03, 2.6862e-03, 1.8034e-03],
          [1.8590e-03, 1.6151e-03, 1.2481e-03, 3.6038e-04]]],
    ]
    score_list = [torch.tensor(step) for step in steps]
    parents_list = [torch.tensor([[-1, 0, 1, 2, 3], [-1, 0, 1, 2, 3]]), torch.tensor([[4, 8, 9, 10], [4, 5, 6, 7]]),
                    torch.tensor([[20, 24, 21, 28], [24, 28, 20, 21]]),
                    torch.tensor([[36, 40, 41, 44], [36, 40, 44, 45]])]
    scores = torch.cat(score_list, dim=1).flatten(1)
    selected_index = torch.sort(torch.topk(scores, 8 - 1, dim=-1).indices).values
    return torch.cat(parents_list[:-1], dim=1), selected_index, torch.tensor([5, 10])


def mask_buffer(mode, B, N, seq_lens_sum, device="cpu"):
    """The tree_mask buffer sglang allocates for each mode."""
    if mode == TreeMaskMode.FULL_MASK:
        return torch.full((seq_lens_sum * N + N * N * B,), True, device=device)
    if mode == TreeMaskMode.QLEN_ONLY:
        return torch.full((N * B * N,), True, device=device)
    dtype = [torch.uint8, torch.uint16, torch.uint32][(N > 8) + (N > 16)]
    return torch.zeros((N * B,), dtype=dtype, device=device)


def run_build(parent_list, selected_index, seq_lens, topk, depth, N, mode, device="cpu", spelling="retrive",
              init=None):
    B = seq_lens.numel()
    d = device
    tree_mask = mask_buffer(mode, B, N, int(seq_lens.sum()), d)
    positions = torch.empty(B * N, dtype=torch.long, device=d)
    ri, nt, ns = (torch.full((3, B, N), -1, device=d) if init is None else init.clone().to(d)).unbind(0)
    build_tree_kernel_efficient(parent_list.to(d), selected_index.to(d), seq_lens.to(d), tree_mask, positions,
                                topk=topk, depth=depth, draft_token_num=N, tree_mask_mode=mode,
                                **{f"{spelling}_index": ri, f"{spelling}_next_token": nt,
                                   f"{spelling}_next_sibling": ns})
    return tree_mask.cpu(), positions.cpu(), ri.cpu(), nt.cpu(), ns.cpu()


# each node's ancestors and itself in the peer case, bit j = node j (read off its child lists)
PEER_MASK_BITS = [[1, 3, 5, 11, 21, 43, 85, 171], [1, 3, 7, 11, 19, 35, 75, 203]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(TreeMaskMode))
def test_build_tree_kernel_efficient(backend, mode):
    parent_list, selected_index, seq_lens = peer_build_inputs()
    with fastverify.use_backend(backend):
        tree_mask, position, ri, nt, ns = run_build(parent_list, selected_index, seq_lens, 4, 4, 8, mode,
                                                    BACKEND_DEVICES[backend], "retrieve" if mode else "retrive")
    assert position.tolist() == [5, 6, 6, 7, 7, 8, 8, 9, 10, 11, 12, 12, 12, 12, 13, 14]
    assert ri.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]
    assert nt.tolist() == [[1, 3, 4, 5, 6, 7, -1, -1], [1, 2, -1, 6, -1, -1, 7, -1]]
    assert ns.tolist() == [[-1, 2, -1, -1, -1, -1, -1, -1], [-1, -1, 3, 4, 5, -1, -1, -1]]
    bits = torch.tensor(PEER_MASK_BITS)
    rows = ((bits[..., None] >> torch.arange(8)) & 1).bool()                   # [B, t, c]
    if mode == TreeMaskMode.QLEN_ONLY_BITPACKING:
        assert tree_mask.tolist() == sum(PEER_MASK_BITS, [])
    elif mode == TreeMaskMode.QLEN_ONLY:
        assert torch.equal(tree_mask.view(2, 8, 8), rows)
    else:
        first, second = tree_mask[:8 * 13].view(8, 13), tree_mask[8 * 13:].view(8, 18)
        assert first[:, :5].all() and second[:, :10].all()                     # prefix columns untouched
        assert torch.equal(first[:, 5:], rows[0]) and torch.equal(second[:, 10:], rows[1])
    want = oracle_build(parent_list, selected_index, seq_lens, 4, 4, 8, mode)
    assert_build_equal((tree_mask, position, ri, nt, ns), want)


# ----------------------------------------------------------------------------- oracles (the kernels, per thread)


def oracle_greedy(cand, ri, nt, ns, target_predict, K, predicts, accept_index):
    """VerifyTreeGreedy of eagle_utils.cu, one request at a time (lists, mutated)."""
    B = len(cand)
    flat_target = sum(target_predict, [])
    num_out = []
    for b in range(B):
        last = ri[b][0]
        accept_index[b][0] = last
        num, cur = 0, 0
        for _ in range(1, K):
            cur = nt[b][cur]
            while cur != -1:
                if cand[b][cur] == flat_target[last]:
                    predicts[last] = flat_target[last]
                    num += 1
                    accept_index[b][num] = ri[b][cur]
                    last = ri[b][cur]
                    break
                cur = ns[b][cur]
            if cur == -1:
                break
        num_out.append(num)
        predicts[last] = flat_target[last]
    return num_out


def oracle_sampling(cand, ri, nt, ns, coins, final_coins, target, draft, K, t_single, t_acc, predicts,
                    accept_index):
    """TreeSpeculativeSamplingTargetOnly of speculative_sampling.cuh (0.3.21), one request
    at a time: float32 acceptance sums (numpy), the residual's CDF in float64, draft
    mutated in place."""
    B, N, V = target.shape
    f32 = np.float32
    t_single, t_acc = f32(t_single), max(f32(t_acc), f32(1e-9))
    num_out = []
    for b in range(B):
        acc, row, coin = f32(0), 0, coins[b, 0]
        last = ri[b][0]
        accept_index[b][0] = last
        num, cur = 0, 0
        for _ in range(1, K):
            cur = nt[b][cur]
            while cur != -1:
                tok = cand[b][cur]
                p = target[b, row, tok]
                acc = f32(acc + p)
                if coin <= f32(acc / t_acc) or p >= t_single:
                    acc, coin = f32(0), coins[b, cur]
                    row = cur
                    predicts[last] = tok
                    num += 1
                    accept_index[b][num] = ri[b][cur]
                    last = ri[b][cur]
                    break
                draft[b, row, tok] = target[b, row, tok]
                cur = ns[b][cur]
            if cur == -1:
                break
        num_out.append(num)
        q = target[b, row].astype(np.float64)
        d = np.zeros(V) if num == K - 1 else draft[b, row].astype(np.float64)
        res = np.maximum(q - d, 0)
        cdf = np.cumsum(res)
        u = float(final_coins[b]) * cdf[-1]
        hits = [x for x in range(V) if res[x] > 0 and cdf[x] > u]
        predicts[last] = hits[0] if hits else V - 1
    return num_out


def oracle_build(parent_list, selected_index, seq_lens, topk, depth, N, mode, init=None):
    """build_tree_efficient / build_tree_efficient_partial_packed of eagle_utils.cu, every
    thread of every block in turn (trees whose parents are all found)."""
    pl, sel, L = parent_list.tolist(), selected_index.tolist(), seq_lens.tolist()
    B = len(L)
    nbytes = 1 if N <= 8 else 2 if N <= 16 else 4
    if mode == TreeMaskMode.QLEN_ONLY_BITPACKING:
        mask = [0] * (B * N * nbytes)
    else:
        mask = [True] * (sum(L) * N + B * N * N if mode == TreeMaskMode.FULL_MASK else B * N * N)
    pos = [0] * (B * N)
    ri = [[-1] * N for _ in range(B)]
    nt = [[-1] * N for _ in range(B)] if init is None else init[1].tolist()
    ns = [[-1] * N for _ in range(B)] if init is None else init[2].tolist()
    if init is not None:
        ri = init[0].tolist()

    def find(b, value):
        return next(c for c in range(N - 1) if sel[b][c] == value)

    for b in range(B):
        seq_tree_idx = N * N * b + sum(L[:b]) * N
        for tid in range(N):
            if mode == TreeMaskMode.FULL_MASK:
                base = seq_tree_idx + (L[b] + N) * tid + L[b] + 1
            else:
                base = N * N * b + N * tid + 1
            if mode == TreeMaskMode.QLEN_ONLY_BITPACKING:
                mask[(b * N + tid) * nbytes] = 1
            else:
                mask[base - 1] = True
                for i in range(N - 1):
                    mask[base + i] = False
            if tid == 0:
                pos[b * N] = L[b]
                for i in range(N - 1, 0, -1):
                    ri[b][i] = b * N + i
                    slot = sel[b][i - 1] // topk
                    parent = find(b, pl[b][slot]) + 1 if slot > 0 else 0
                    if nt[b][parent] == -1:
                        nt[b][parent] = i
                    else:
                        ns[b][i] = nt[b][parent]
                        nt[b][parent] = i
                ri[b][0] = b * N
                continue
            cur, position = tid - 1, 0
            while True:
                position += 1
                if mode == TreeMaskMode.QLEN_ONLY_BITPACKING:
                    mask[(b * N + tid) * nbytes + (cur + 1) // 8] |= 1 << ((cur + 1) % 8)
                else:
                    mask[base + cur] = True
                slot = sel[b][cur] // topk
                if slot == 0:
                    break
                cur = find(b, pl[b][slot])
            pos[b * N + tid] = position + L[b]
    if mode == TreeMaskMode.QLEN_ONLY_BITPACKING:   # bytes → little-endian rows
        mask = [int.from_bytes(bytes(mask[r * nbytes:(r + 1) * nbytes]), "little") for r in range(B * N)]
    return mask, pos, ri, nt, ns


def assert_build_equal(got, want):
    tree_mask, positions, ri, nt, ns = got
    if tree_mask.dtype != torch.bool:
        tree_mask = tree_mask.view(torch.uint8).view(-1, {torch.uint8: 1, torch.uint16: 2, torch.uint32: 4}[
            tree_mask.dtype]).long()
        tree_mask = (tree_mask << (8 * torch.arange(tree_mask.shape[1]))).sum(1)
    assert tree_mask.tolist() == want[0]
    assert positions.tolist() == want[1]
    assert ri.tolist() == want[2] and nt.tolist() == want[3] and ns.tolist() == want[4]


# ----------------------------------------------------------------------------- random trees


def random_tree(B, N, V, gen, ascending=False):
    """Random trees (a parent precedes its child), child lists in random (or sglang's
    ascending) order, retrive_index a permutation of [0, B·N), siblings with distinct tokens."""
    nt = torch.full((B, N), -1)
    ns = torch.full((B, N), -1)
    cand = torch.zeros(B, N, dtype=torch.long)
    for b in range(B):
        par = [-1] + [int(torch.randint(0, t, (1,), generator=gen)) for t in range(1, N)]
        for p in range(N):
            kids = [t for t in range(1, N) if par[t] == p]
            if not ascending:
                kids = [kids[i] for i in torch.randperm(len(kids), generator=gen).tolist()]
            toks = torch.randperm(V, generator=gen)[:len(kids)].tolist()
            for i, t in enumerate(kids):
                cand[b, t] = toks[i]
                if i == 0:
                    nt[b, p] = t
                else:
                    ns[b, kids[i - 1]] = t
        cand[b, 0] = int(torch.randint(0, V, (1,), generator=gen))
    ri = torch.randperm(B * N, generator=gen).view(B, N)
    return cand, ri, nt, ns


@pytest.mark.parametrize("seed", range(6))
def test_verify_tree_greedy_matches_oracle(seed):
    gen = torch.Generator().manual_seed(seed)
    B, N, V = 5, [1, 2, 5, 8, 12, 16][seed], 7
    K = [1, 3, 4, 5, 6, 17][seed]
    cand, ri, nt, ns = random_tree(B, N, V, gen, ascending=seed % 2 == 0)
    # the target's argmax: a child's token most of the time, so paths get deep
    pick = torch.where(torch.rand(B, N, generator=gen) < 0.75, nt.clamp(min=0),
                       torch.randint(0, N, (B, N), generator=gen))
    target_predict = torch.where(torch.rand(B, N, generator=gen) < 0.9, cand.gather(1, pick),
                                 torch.randint(0, V, (B, N), generator=gen))
    target_predict = target_predict.flatten()[torch.argsort(ri.flatten())].view(B, N)  # addressed by retrive_index
    predicts, accept_index, accept_token_num = outputs(B, K, B * N)
    want_p, want_a = predicts.tolist(), accept_index.tolist()
    want_n = oracle_greedy(cand.tolist(), ri.tolist(), nt.tolist(), ns.tolist(), target_predict.tolist(), K, want_p,
                           want_a)
    verify_tree_greedy(predicts, accept_index, accept_token_num, cand, ri, nt, ns, target_predict)
    assert predicts.tolist() == want_p and accept_index.tolist() == want_a and accept_token_num.tolist() == want_n
    if N >= 3 and K >= 3:
        assert max(want_n) >= 1                                                # the walks went somewhere


@pytest.mark.parametrize("seed, t_single, t_acc", [(0, 1.0, 1.0), (1, 1.0, 1.0), (2, 0.3, 0.6), (3, 0.0, 0.0),
                                                  (4, 1.0, 0.0), (5, 0.05, 1.0), (6, 1.0, 1.0)])
def test_tree_speculative_sampling_matches_oracle(seed, t_single, t_acc):
    gen = torch.Generator().manual_seed(seed)
    B, N, V = 6, [6, 8, 5, 8, 10, 7, 1][seed], 11
    K = [4, 8, 3, 5, 4, 1, 2][seed]
    cand, ri, nt, ns = random_tree(B, N, V, gen, ascending=seed % 2 == 1)
    # peaked rows (some one-hot) so that children get accepted; caller's draft_probs not zero
    target = torch.softmax(torch.randn(B, N, V, generator=gen) * 3, -1)
    target[0, 0] = F.one_hot(torch.tensor(V - 1), V).float()
    draft = torch.rand(B, N, V, generator=gen) * (0.05 if seed % 2 else 0.0)
    coins, final_coins = torch.rand(B, N, generator=gen), torch.rand(B, generator=gen)
    coins[1, 0] = 0.0                                                          # the lower endpoint of a coin
    predicts, accept_index, accept_token_num = outputs(B, K, B * N)
    want_p, want_a, want_d = predicts.tolist(), accept_index.tolist(), draft.numpy().copy()
    want_n = oracle_sampling(cand.tolist(), ri.tolist(), nt.tolist(), ns.tolist(), coins.numpy(), final_coins.numpy(),
                             target.numpy(), want_d, K, t_single, t_acc, want_p, want_a)
    tree_speculative_sampling_target_only(predicts, accept_index, accept_token_num, cand, ri, nt, ns, coins,
                                          final_coins, target, draft, t_single, t_acc)
    assert predicts.tolist() == want_p
    assert accept_index.tolist() == want_a and accept_token_num.tolist() == want_n
    assert np.array_equal(draft.numpy(), want_d)                               # the in-place draft_probs writes


def eagle_expansion(B, topk, depth, N, gen):
    """(parent_list, selected_index) as sglang's EAGLE drafter produces them: step 0 scores
    topk children of the root, each later step expands the topk best nodes of the step
    before by topk children each (scores multiply, so a node outranks its children), and
    the N - 1 best of all scored nodes are kept, sorted."""
    pls, sels = [], []
    for _ in range(B):
        scores = (torch.rand(topk, generator=gen) * 0.9 + 0.05).tolist()
        parent_list, frontier = [-1] + list(range(topk)), list(range(topk))
        for step in range(1, depth):
            base = len(scores)
            for p in frontier:
                scores += (torch.tensor(scores[p]) * (torch.rand(topk, generator=gen) * 0.9 + 0.05)).tolist()
            step_scores = torch.tensor(scores[base:])
            frontier = (base + torch.topk(step_scores, topk).indices).tolist()
            if step < depth - 1:
                parent_list += frontier
        sels.append(torch.sort(torch.topk(torch.tensor(scores), N - 1).indices).values)
        pls.append(torch.tensor(parent_list if depth > 1 else [], dtype=torch.long))
    return torch.stack(pls), torch.stack(sels)


BUILD_SHAPES = [(2, 2, 1, 3), (3, 2, 3, 5), (2, 4, 4, 8), (2, 3, 5, 12), (1, 4, 6, 17), (2, 8, 4, 32), (1, 10, 5, 40)]


# bit packing holds at most 32 nodes per row (sgl-kernel's uint8/16/32 rows)
@pytest.mark.parametrize("B, topk, depth, N, mode", [(*shape, mode) for shape in BUILD_SHAPES for mode in TreeMaskMode
                                                     if not (mode == TreeMaskMode.QLEN_ONLY_BITPACKING and shape[3] > 32)])
def test_build_tree_kernel_efficient_matches_oracle(B, topk, depth, N, mode):
    gen = torch.Generator().manual_seed(B * 1000 + N)
    parent_list, selected_index = eagle_expansion(B, topk, depth, N, gen)
    seq_lens = torch.randint(0, 9, (B,), generator=gen)
    got = run_build(parent_list, selected_index, seq_lens, topk, depth, N, mode)
    assert_build_equal(got, oracle_build(parent_list, selected_index, seq_lens, topk, depth, N, mode))


@pytest.mark.parametrize("backend", BACKENDS)
def test_build_tree_kernel_efficient_backends_agree(backend):
    gen = torch.Generator().manual_seed(7)
    parent_list, selected_index = eagle_expansion(3, 3, 4, 10, gen)
    seq_lens = torch.tensor([4, 0, 6])
    for mode in TreeMaskMode:
        with fastverify.use_backend(backend):
            got = run_build(parent_list, selected_index, seq_lens, 3, 4, 10, mode, BACKEND_DEVICES[backend])
        assert_build_equal(got, oracle_build(parent_list, selected_index, seq_lens, 3, 4, 10, mode))


def test_build_tree_kernel_efficient_keeps_callers_links():
    """The kernel only writes links that exist and inserts each child at the head of its
    parent's list: a first-child link already in retrive_next_token becomes the largest
    child's sibling; untouched slots keep the caller's values (sglang fills -1 first)."""
    parent_list, selected_index, seq_lens = peer_build_inputs()
    init = torch.randint(-1, 8, (3, 2, 8), generator=torch.Generator().manual_seed(3))
    got = run_build(parent_list, selected_index, seq_lens, 4, 4, 8, TreeMaskMode.QLEN_ONLY, init=init)
    want = oracle_build(parent_list, selected_index, seq_lens, 4, 4, 8, TreeMaskMode.QLEN_ONLY, init=init)
    assert_build_equal(got, want)
    assert got[4].tolist() != [[-1, 2, -1, -1, -1, -1, -1, -1], [-1, -1, 3, 4, 5, -1, -1, -1]]


# ----------------------------------------------------------------------------- the law


def test_sampling_emits_the_target_distribution():
    """Thresholds 1, draft_probs zero (sglang's call): every emitted token follows the target.

    Tree: root → a (token 1), b (token 4); a → c (token 2). K = 3. Per row, the first
    token follows target[root]; after accepting a the next follows target[a]; after a then
    c (K - 1 drafts: the bonus) the next follows target[c]; after b it follows target[b]."""
    R, N, V, K = 40000, 4, 6, 3
    gen = torch.Generator().manual_seed(11)
    rows = torch.tensor([[0.10, 0.25, 0.05, 0.20, 0.30, 0.10],      # root: children tokens 1 and 4
                         [0.15, 0.05, 0.40, 0.10, 0.20, 0.10],      # a: child token 2
                         [0.30, 0.10, 0.10, 0.10, 0.10, 0.30],      # b (leaf)
                         [0.05, 0.15, 0.20, 0.25, 0.15, 0.20]])     # c (leaf)
    target = rows.expand(R, N, V)
    cand = torch.tensor([[0, 1, 4, 2]]).expand(R, N).contiguous()
    ri = torch.arange(R * N).view(R, N)
    nt = torch.tensor([[1, 3, -1, -1]]).expand(R, N).contiguous()
    ns = torch.tensor([[-1, 2, -1, -1]]).expand(R, N).contiguous()
    predicts, accept_index, accept_token_num = outputs(R, K, R * N)
    tree_speculative_sampling_target_only(predicts, accept_index, accept_token_num, cand, ri, nt, ns,
                                          torch.rand(R, N, generator=gen), torch.rand(R, generator=gen), target,
                                          torch.zeros(R, N, V))
    emitted = predicts.view(R, N).long()
    first = emitted[:, 0]
    path = accept_index.long() - (torch.arange(R) * N)[:, None]                 # tree-local, < 0 past the path
    checks = [(torch.ones(R, dtype=torch.bool), first, rows[0]),
              (path[:, 1] == 1, emitted[:, 1], rows[1]),
              ((path[:, 1] == 1) & (path[:, 2] == 3), emitted[:, 3], rows[3]),
              (path[:, 1] == 2, emitted[:, 2], rows[2])]
    for rows_in, tokens, p in checks:
        counts = torch.bincount(tokens[rows_in], minlength=V).double()
        assert counts.sum() > 2000
        assert stats.chisquare(counts.numpy(), (counts.sum() * p.double() / p.double().sum()).numpy()).pvalue > 1e-3
    # the accept path's own law: a is accepted with target[root][1], b with target[root][4]
    n = float(R)
    assert abs((path[:, 1] == 1).sum() / n - 0.25) < 0.01 and abs((path[:, 1] == 2).sum() / n - 0.30) < 0.01


# ----------------------------------------------------------------------------- no host reads


@contextmanager
def no_host_reads(monkeypatch):
    """Any read of tensor data back to Python raises; value checks off, as on CUDA without
    FASTVERIFY_CHECKS."""
    def boom(*args, **kwargs):
        raise AssertionError("host read of tensor data on the hot path")

    with monkeypatch.context() as m:
        m.setattr(fastverify._backend, "value_checks_enabled", lambda t: False)
        for name in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, boom)
        yield


def test_no_host_reads(monkeypatch):
    cand, ri, nt, ns, logits = peer_tree()
    probs = F.softmax(logits, -1)
    coins, final = torch.rand(2, 6), torch.rand(2)
    parent_list, selected_index, seq_lens = peer_build_inputs()
    masks = {0: torch.ones(15 * 8 + 2 * 64, dtype=torch.bool), 1: torch.ones(2 * 64, dtype=torch.bool),
             2: torch.zeros(16, dtype=torch.uint8)}
    positions = torch.empty(16, dtype=torch.long)
    links = list(torch.full((3, 2, 8), -1).unbind(0))
    # the op's own graph-safety is tested with the ops; here its result is fixed
    op_out = fastverify.build_tree(torch.tensor([-1, 0, 0, 1, 2, 3, 4, 5, -1, 0, 1, 1, 1, 1, 3, 6]),
                                   torch.tensor([0, 8, 16], dtype=I32), seq_lens, max_nodes=8)
    monkeypatch.setattr(sglang, "build_tree", lambda *a, **k: op_out)
    greedy, sampled = outputs(2, 4, 12), outputs(2, 4, 12)
    with no_host_reads(monkeypatch):
        verify_tree_greedy(*greedy, cand, ri, nt, ns, logits.argmax(-1))
        tree_speculative_sampling_target_only(*sampled, cand, ri, nt, ns, coins, final, probs, torch.zeros_like(probs))
        for mode, tree_mask in masks.items():
            build_tree_kernel_efficient(parent_list, selected_index, seq_lens, tree_mask, positions, *links, 4, 4, 8,
                                        mode)
    assert greedy[0].tolist() == [3, -1, -1, 4, 5, 18, 11, -1, -1, -1, 12, 18] and greedy[2].tolist() == [3, 2]
    assert sampled[2].tolist() == [3, 2]
    assert links[1].tolist() == [[1, 3, 4, 5, 6, 7, -1, -1], [1, 2, -1, 6, -1, -1, 7, -1]]
    assert positions.tolist() == [5, 6, 6, 7, 7, 8, 8, 9, 10, 11, 12, 12, 12, 12, 13, 14]
    assert masks[2].tolist() == sum(PEER_MASK_BITS, [])


# ----------------------------------------------------------------------------- the surface and bad input


def test_signatures_match_sgl_kernel():
    want = {
        verify_tree_greedy: ["predicts", "accept_index", "accept_token_num", "candidates", "retrive_index",
                             "retrive_next_token", "retrive_next_sibling", "target_predict"],
        tree_speculative_sampling_target_only: [
            "predicts", "accept_index", "accept_token_num", "candidates", "retrive_index", "retrive_next_token",
            "retrive_next_sibling", "uniform_samples", "uniform_samples_for_final_sampling", "target_probs",
            "draft_probs", "threshold_single", "threshold_acc", "deterministic"],
        build_tree_kernel_efficient: ["parent_list", "selected_index", "verified_seq_len", "tree_mask", "positions",
                                      "retrive_index", "retrive_next_token", "retrive_next_sibling", "topk", "depth",
                                      "draft_token_num", "tree_mask_mode"],
    }
    for fn, names in want.items():
        params = inspect.signature(fn).parameters.values()
        assert [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD] == names
        assert [p.name for p in params if p.kind == p.KEYWORD_ONLY] == [
            "retrieve_index", "retrieve_next_token", "retrieve_next_sibling"]
    defaults = inspect.signature(tree_speculative_sampling_target_only).parameters
    assert (defaults["threshold_single"].default, defaults["threshold_acc"].default,
            defaults["deterministic"].default) == (1.0, 1.0, True)


def greedy_args(**over):
    cand, ri, nt, ns, logits = peer_tree()
    p, a, n = outputs(2, 4, 12)
    args = dict(predicts=p, accept_index=a, accept_token_num=n, candidates=cand, retrive_index=ri,
                retrive_next_token=nt, retrive_next_sibling=ns, target_predict=logits.argmax(-1))
    args.update(over)
    return args


def sampling_args(**over):
    cand, ri, nt, ns, logits = peer_tree()
    p, a, n = outputs(2, 4, 12)
    probs = F.softmax(logits, -1)
    args = dict(predicts=p, accept_index=a, accept_token_num=n, candidates=cand, retrive_index=ri,
                retrive_next_token=nt, retrive_next_sibling=ns, uniform_samples=torch.rand(2, 6),
                uniform_samples_for_final_sampling=torch.rand(2), target_probs=probs,
                draft_probs=torch.zeros_like(probs))
    args.update(over)
    return args


def build_args(**over):
    parent_list, selected_index, seq_lens = peer_build_inputs()
    ri, nt, ns = torch.full((3, 2, 8), -1)
    args = dict(parent_list=parent_list, selected_index=selected_index, verified_seq_len=seq_lens,
                tree_mask=torch.ones(15 * 8 + 2 * 64, dtype=torch.bool), positions=torch.empty(16, dtype=torch.long),
                retrive_index=ri, retrive_next_token=nt, retrive_next_sibling=ns, topk=4, depth=4, draft_token_num=8,
                tree_mask_mode=0)
    args.update(over)
    return args


BAD = [
    (verify_tree_greedy, greedy_args, dict(candidates=torch.zeros(2, 6, dtype=I32)), "candidates"),
    (verify_tree_greedy, greedy_args, dict(predicts=torch.zeros(12, dtype=torch.long)), "predicts"),
    (verify_tree_greedy, greedy_args, dict(accept_index=torch.zeros(3, 4, dtype=I32)), "accept_index"),
    (verify_tree_greedy, greedy_args, dict(accept_token_num=torch.zeros(2, 1, dtype=I32)), "accept_token_num"),
    (verify_tree_greedy, greedy_args, dict(retrive_next_token=torch.zeros(2, 5, dtype=torch.long)),
     "retrive_next_token"),
    (verify_tree_greedy, greedy_args, dict(target_predict=torch.zeros(2, 6, dtype=I32)), "target_predict"),
    (verify_tree_greedy, greedy_args, dict(retrive_index=torch.zeros(2, 6, dtype=torch.long, device="meta")),
     "retrive_index"),
    (verify_tree_greedy, greedy_args, dict(retrive_next_sibling=torch.full((2, 6), 6)), "retrive_next_sibling"),
    (verify_tree_greedy, greedy_args, dict(retrive_index=torch.arange(12).view(2, 6) + 1), "retrive_index"),
    (tree_speculative_sampling_target_only, sampling_args, dict(threshold_single=1.5), "threshold_single"),
    (tree_speculative_sampling_target_only, sampling_args, dict(threshold_acc=-0.1), "threshold_acc"),
    (tree_speculative_sampling_target_only, sampling_args, dict(threshold_acc=float("nan")), "threshold_acc"),
    (tree_speculative_sampling_target_only, sampling_args, dict(target_probs=torch.rand(2, 6, 20).double()),
     "target_probs"),
    (tree_speculative_sampling_target_only, sampling_args, dict(draft_probs=torch.zeros(2, 6, 19)), "draft_probs"),
    (tree_speculative_sampling_target_only, sampling_args, dict(uniform_samples=torch.rand(2, 5)),
     "uniform_samples"),
    (tree_speculative_sampling_target_only, sampling_args, dict(uniform_samples_for_final_sampling=torch.rand(3)),
     "uniform_samples_for_final_sampling"),
    (tree_speculative_sampling_target_only, sampling_args, dict(candidates=torch.tensor([[0, 1, 2, 3, 4, 20]] * 2)),
     "candidates"),
    (tree_speculative_sampling_target_only, sampling_args, dict(retrive_next_token=torch.full((2, 6), -2)),
     "retrive_next_token"),
    (build_tree_kernel_efficient, build_args, dict(tree_mask_mode=3), "tree_mask_mode"),
    (build_tree_kernel_efficient, build_args, dict(topk=0), "topk"),
    (build_tree_kernel_efficient, build_args, dict(parent_list=torch.zeros(2, 12, dtype=torch.long)), "parent_list"),
    (build_tree_kernel_efficient, build_args, dict(selected_index=torch.zeros(2, 8, dtype=torch.long)),
     "selected_index"),
    (build_tree_kernel_efficient, build_args, dict(verified_seq_len=torch.tensor([5, -1])), "verified_seq_len"),
    (build_tree_kernel_efficient, build_args, dict(tree_mask=torch.ones(15 * 8 + 2 * 64 - 1, dtype=torch.bool)),
     "tree_mask"),
    (build_tree_kernel_efficient, build_args, dict(tree_mask=torch.ones(2 * 64 + 10, dtype=torch.bool)), "tree_mask"),
    (build_tree_kernel_efficient, build_args, dict(tree_mask=torch.ones(2 * 64 * 2, dtype=torch.uint8)), "tree_mask"),
    (build_tree_kernel_efficient, build_args, dict(tree_mask=torch.zeros(15, dtype=torch.uint8), tree_mask_mode=2),
     "tree_mask"),
    (build_tree_kernel_efficient, build_args, dict(positions=torch.empty(15, dtype=torch.long)), "positions"),
    (build_tree_kernel_efficient, build_args, dict(retrive_next_sibling=torch.full((2, 8), -1, dtype=I32)),
     "retrive_next_sibling"),
]


@pytest.mark.parametrize("fn, make, over, name", BAD,
                         ids=[f"{b[0].__name__[:12]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(fn, make, over, name):
    with pytest.raises(ValueError, match=name):
        fn(**make(**over))


def test_bit_packing_refuses_more_than_32_nodes():
    parent_list, selected_index = eagle_expansion(1, 8, 5, 33, torch.Generator().manual_seed(0))
    ri, nt, ns = torch.full((3, 1, 33), -1)
    with pytest.raises(ValueError, match="QLEN_ONLY_BITPACKING"):
        build_tree_kernel_efficient(parent_list, selected_index, torch.tensor([3]),
                                    torch.zeros(33 * 8, dtype=torch.uint8), torch.empty(33, dtype=torch.long),
                                    ri, nt, ns, 8, 5, 33, 2)


@pytest.mark.parametrize("fn, make", [(verify_tree_greedy, greedy_args),
                                      (tree_speculative_sampling_target_only, sampling_args),
                                      (build_tree_kernel_efficient, build_args)])
def test_spellings(fn, make):
    args = make()
    with pytest.raises(TypeError, match="both retrive_index and retrieve_index"):
        fn(**args, retrieve_index=args["retrive_index"])
    del args["retrive_next_token"]
    with pytest.raises(TypeError, match="retrive_next_token"):
        fn(**args)


def test_bad_ids_stay_in_bounds_without_value_checks(monkeypatch):
    """As on CUDA without FASTVERIFY_CHECKS: out-of-range links, ids and addresses are never
    used as addresses (a wrong read on CPU would raise IndexError)."""
    monkeypatch.setattr(fastverify._backend, "value_checks_enabled", lambda t: False)
    cand, ri, nt, ns, logits = peer_tree()
    bad_cand = torch.tensor([[0, -7, 2, 99, 4, 5], [7, 8, 9, 10, 11, 1 << 40]])
    bad_ri = torch.tensor([[0, -1, 2, 3, 400, 5], [6, 7, 8, 9, 10, 11]])
    bad_nt = torch.tensor([[1, 2, -1, 9, 5, -1], [4, 2, 3, -1, 5, -5]])
    bad_ns = torch.tensor([[-1, 3, 1000, -1, -1, -1], [-1, -1, -1, -1, 1, -1]])
    probs = F.softmax(logits, -1)
    p, a, n = outputs(2, 4, 12)
    verify_tree_greedy(p, a, n, bad_cand, bad_ri, bad_nt, bad_ns, logits.argmax(-1))
    assert n.tolist() == [0, 1]
    p, a, n = outputs(2, 4, 12)
    tree_speculative_sampling_target_only(p, a, n, bad_cand, bad_ri, bad_nt, bad_ns, torch.rand(2, 6), torch.rand(2),
                                          probs, torch.zeros_like(probs), 0.0, 0.0)
    assert ((p >= -1) & (p < 20)).all() and n.tolist() == [0, 1]             # invalid ids are rejected
    args = build_args(verified_seq_len=torch.tensor([50, 10]), selected_index=torch.tensor([[0, 1, 4, 8, 20, 24, 36],
                                                                                          [-3, 4, 5, 999, 7, 24, 36]]))
    before = args["tree_mask"].clone()
    build_tree_kernel_efficient(**args)                                        # FULL_MASK too small: nothing written
    assert torch.equal(args["tree_mask"], before)
    build_tree_kernel_efficient(**build_args(selected_index=args["selected_index"], tree_mask_mode=1,
                                             tree_mask=torch.ones(128, dtype=torch.bool)))
