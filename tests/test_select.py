"""The streamed global greedy selection equals the one-vector greedy fill (capllm.allocate.select)."""

from __future__ import annotations

import weakref

import pytest
import torch

from capllm.allocate.final_mask import bounded_fill, fill_remainder, greedy_fill, rank_order
from capllm.allocate.select import Segment, streamed_bounded, streamed_greedy



@pytest.fixture(autouse=True)
def _one_thread():
    """Many tiny tensor ops: one thread avoids the pool's wake-up cost on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_VALUES = torch.tensor([0.0, -0.0, 0.125, 0.5, 0.5, 1.0, 3.0, 1e-30, float("inf")])


def _problem(seed, n_mat=14, max_size=120):
    g = torch.Generator().manual_seed(seed)
    segs, keys = [], []
    for _ in range(n_mat):
        size = int(torch.randint(0, max_size, (1,), generator=g))
        rank = int(torch.randint(0, min(size, 8) + 1, (1,), generator=g))
        d = [1, 2, 5, 17, 40][int(torch.randint(0, 5, (1,), generator=g))]
        segs.append(Segment(size, rank, d))
        if seed % 2:  # heavy ties: a few values, zeros (and −0.0) included
            keys.append(_VALUES[torch.randint(0, len(_VALUES), (size,), generator=g)])
        else:
            keys.append(torch.randint(0, 4, (size,), generator=g).float() * torch.rand(size, generator=g).round(decimals=1))
    return segs, keys


def _concat(segs, keys):
    return torch.cat(keys), torch.cat([s.cost() for s in segs])


def _budgets(s, c, seed):
    """Edge cases plus budgets around every direction's position in the ranking."""
    total = int(c.sum())
    cost = c[rank_order(s)]
    csum = torch.cumsum(cost, 0)
    out = {0, 1, 2, total - 1, total, total + 3, max(total - 41, 0)}
    for i in torch.nonzero(cost > 1).squeeze(1).tolist()[:: max(1, int(cost.gt(1).sum()) // 12)]:
        out |= {int(csum[i]) - 1, int(csum[i]), int(csum[i]) - int(cost[i]) + 1}  # inside a direction: the remainder goes past it
    g = torch.Generator().manual_seed(seed)
    out |= {int(x) for x in torch.randint(0, total + 1, (10,), generator=g)}
    return sorted(b for b in out if b >= 0)


def _run(segs, keys, budget, allowed=None, bounded=None):
    got = {}

    def store(k, keep):
        assert k not in got and k == len(got)  # once each, in order
        assert keep.dtype == torch.bool and keep.shape == (segs[k].size,)
        got[k] = keep.clone()

    load = lambda k: keys[k].clone()
    if bounded is None:
        diag = streamed_greedy(segs, load, budget, store, allowed=None if allowed is None else (lambda k: allowed[k]))
    else:
        diag = streamed_bounded(segs, load, budget, bounded[0], bounded[1], store)
    assert len(got) == len(segs)
    return torch.cat([got[k] for k in range(len(segs))]), diag


@pytest.mark.parametrize("seed", range(6))
def test_streamed_equals_greedy_fill(seed):
    segs, keys = _problem(seed)
    s, c = _concat(segs, keys)
    for budget in _budgets(s, c, seed):
        mask, diag = _run(segs, keys, budget)
        want = greedy_fill(s, c, budget)
        assert torch.equal(mask, want), budget
        assert diag["spent"] == int(c[mask].sum()) <= budget
        assert diag["candidates"] == s.numel()
        assert diag["passes"] == (2 if int(c.sum()) <= budget else 4)


def _walk(s, c, budget, allowed):
    """Independent reference: the plain sequential greedy walk in rank order over the allowed candidates."""
    order = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
    keep, left = torch.zeros(len(s), dtype=torch.bool), budget
    for i in order:
        if allowed[i] and int(c[i]) <= left:
            keep[i] = True
            left -= int(c[i])
    return keep


@pytest.mark.parametrize("seed", range(4))
def test_streamed_with_allowed_equals_sequential_walk(seed):
    segs, keys = _problem(seed + 10, n_mat=10, max_size=80)
    s, c = _concat(segs, keys)
    g = torch.Generator().manual_seed(seed)
    allowed = [torch.rand(sg.size, generator=g) < 0.7 for sg in segs]
    allowed[0][:] = False
    a = torch.cat(allowed)
    order = rank_order(s)
    for i, budget in enumerate(_budgets(s, c, seed)):
        mask, _ = _run(segs, keys, budget, allowed=allowed)
        keep_sorted = torch.zeros(s.numel(), dtype=torch.bool)  # bounded_fill's walk with zero floors
        fill_remainder(keep_sorted, c[order].long(), budget, allowed=a[order])
        want = torch.zeros_like(keep_sorted)
        want[order] = keep_sorted
        assert torch.equal(mask, want), budget
        if i % 4 == 0:
            assert torch.equal(mask, _walk(s, c, budget, a)), budget


def test_remainder_after_a_direction_that_did_not_fit_and_equal_keys_across_matrices():
    # all keys equal: rank order = global index; the direction of matrix 1 does not fit, the walk
    # then fills with later entries of matrix 1 and of matrix 2 and a cheaper direction of matrix 2
    segs = [Segment(4, 1, 10), Segment(5, 2, 30), Segment(6, 2, 3)]
    keys = [torch.full((sg.size,), 0.5) for sg in segs]
    s, c = _concat(segs, keys)
    for budget in range(0, int(c.sum()) + 2):
        mask, diag = _run(segs, keys, budget)
        assert torch.equal(mask, greedy_fill(s, c, budget)), budget
    mask, diag = _run(segs, keys, 20)  # 13 kept in matrix 0, direction of cost 30 does not fit: 7 left
    assert diag["boundary"] == 4 and diag["threshold"] == 0.5 and diag["remainder_filled"] == 7


@pytest.mark.parametrize("seed", range(5))
def test_streamed_bounded_equals_bounded_fill(seed):
    segs, keys = _problem(seed + 20)
    s, c = _concat(segs, keys)
    seg_id = torch.repeat_interleave(torch.arange(len(segs)), torch.tensor([sg.size for sg in segs]))
    total = torch.tensor([float(sg.cost().sum()) for sg in segs])
    g = torch.Generator().manual_seed(seed)
    for trial in range(6):
        lo = torch.rand(len(segs), generator=g) * 0.5
        floor = (total * lo).floor()
        cap = (total * (lo + torch.rand(len(segs), generator=g) * 0.6)).floor()
        if trial == 0:
            floor.zero_()
            cap.fill_(1e12)
        fl, cp = [int(x) for x in floor], [int(x) for x in cap]
        for budget in _budgets(s, c, seed + trial)[::3]:
            try:
                want = bounded_fill(s, c, budget, seg_id, floor, cap)
            except ValueError:
                with pytest.raises(ValueError):
                    _run(segs, keys, budget, bounded=(fl, cp))
                continue
            mask, diag = _run(segs, keys, budget, bounded=(fl, cp))
            assert torch.equal(mask, want), (trial, budget)
            assert diag["spent"] == int(c[mask].sum()) <= budget


def test_one_matrix_at_a_time_and_no_global_tensor(monkeypatch):
    segs, keys = _problem(3, n_mat=40, max_size=300)
    s, c = _concat(segs, keys)
    budget = int(c.sum()) // 3
    want = greedy_fill(s, c, budget)
    calls, live = [], []
    largest = max(sg.size for sg in segs)

    def load(k):
        assert sum(r() is not None for r in live) <= 1  # at most one earlier matrix still held
        calls.append(k)
        t = keys[k].clone()
        live.append(weakref.ref(t))
        return t

    real_cat = torch.cat

    def cat(tensors, *a, **kw):
        out = real_cat(tensors, *a, **kw)
        assert out.numel() <= largest + 16 * 40  # never a concatenation of the model's candidates
        return out

    monkeypatch.setattr(torch, "cat", cat)
    got = []
    diag = streamed_greedy(segs, load, budget, lambda k, keep: got.append((k, keep.clone())), progress=True, desc="test")
    monkeypatch.setattr(torch, "cat", real_cat)
    assert calls == list(range(len(segs))) * diag["passes"] and diag["passes"] == 4
    assert [k for k, _ in got] == list(range(len(segs)))
    assert torch.equal(torch.cat([m for _, m in got]), want)


def test_rejects_bad_keys():
    segs = [Segment(3, 1, 2)]
    for bad in (torch.tensor([0.5, float("nan"), 1.0]), torch.tensor([0.5, -1e-9, 1.0]), torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)):
        with pytest.raises(ValueError):
            streamed_greedy(segs, lambda k: bad, 2, lambda k, m: None)
    with pytest.raises(ValueError):
        streamed_greedy(segs, lambda k: torch.ones(3), -1, lambda k, m: None)
