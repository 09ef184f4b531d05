"""The MaskGIT loop: schedules, sampling correctness, and no host synchronisation."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from amused.sampling import decode, mask_ratios, temperatures, unmask_step

MASK = 99

# Ops that copy a device value to the host (item(), bool(tensor), nonzero's data-dependent shape) or that
# draw through a host-side algorithm. None may run in the on-device sampling path.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "multinomial", "item", "masked_select", "unique", "_unique2"}


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_cosine_and_linear_ratios():
    r = mask_ratios(4, "cosine")
    assert torch.allclose(r[:3], torch.tensor([math.cos(math.pi / 8), math.cos(math.pi / 4), math.cos(3 * math.pi / 8)]))
    assert r[-1] == 0
    assert torch.allclose(mask_ratios(4, "linear"), torch.tensor([0.75, 0.5, 0.25, 0.0]))
    assert torch.allclose(temperatures(3, (2, 0)), torch.tensor([2.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="num_inference_steps"):
        mask_ratios(0)


def _fake_logits(V=16):
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(0)) * 3

    def fn(tokens, timestep):  # (B, h, w) -> (B, V, h, w): depends on the grid, like a model would
        ctx = torch.where(tokens == MASK, 0, tokens).float().mean(dim=(1, 2), keepdim=True)
        logits = table[(torch.arange(tokens.numel()).view(tokens.shape) % V)] + ctx[..., None]  # (B, h, w, V)
        return logits.permute(0, 3, 1, 2)

    return fn


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decode_follows_the_schedule_exactly(schedule):
    tokens = torch.full((3, 8, 8), MASK)
    counts = []
    out = decode(_fake_logits(), tokens, num_steps=6, mask_token_id=MASK, schedule=schedule, draw="gumbel",
                 generator=torch.Generator().manual_seed(0), callback=lambda i, r: counts.append((r.tokens == MASK).sum(1)))
    expected = torch.floor(64 * mask_ratios(6, schedule)).long()
    for step, c in enumerate(counts):
        assert (c == expected[step].clamp(min=1 if step < 5 else 0)).all(), (step, c)
    assert (out != MASK).all() and out.shape == (3, 8, 8)


def test_gumbel_path_makes_no_host_sync():
    tokens = torch.full((2, 4, 4), MASK)
    tokens[0, 0] = 3
    logits_fn = _fake_logits()
    with RecordOps() as rec:
        decode(logits_fn, tokens, num_steps=4, mask_token_id=MASK, draw="gumbel",
               generator=torch.Generator().manual_seed(0))
    assert not (rec.ops & SYNC_OPS), rec.ops & SYNC_OPS
    with RecordOps() as rec:  # the check can see a sync: the reference path has one
        decode(logits_fn, tokens, num_steps=4, mask_token_id=MASK, draw="reference",
               generator=torch.Generator().manual_seed(0))
    assert "multinomial" in rec.ops


@pytest.mark.parametrize("draw", ["gumbel", "cdf"])
def test_fast_draws_sample_the_softmax(draw):
    """The on-device (Gumbel-max) and the CPU's inverse-CDF draws sample the same distribution as
    multinomial(softmax(logits)); a token of probability 0 is never drawn."""
    V, n = 7, 40000
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, -3.0, -math.inf])
    tokens = torch.full((1, n), MASK)
    res = unmask_step(logits.expand(1, n, V), tokens, torch.tensor([n]), torch.tensor(0.5), torch.tensor(1.0), MASK,
                      last=True, draw=draw, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(res.predicted[0], minlength=V).float() / n
    assert torch.allclose(freq, logits.softmax(0), atol=0.01), (freq, logits.softmax(0))
    assert freq[-1] == 0 and freq[0] > 0


def test_cdf_draws_take_one_number_per_token_and_no_host_sync():
    """The CPU's fast draws: one uniform per position for the token and one for the confidence noise (not one per
    codebook entry), the same tokens from the same seed, the schedule kept, and nothing that syncs."""
    tokens = torch.full((2, 4, 4), MASK)
    tokens[0, 0] = 3
    g = torch.Generator().manual_seed(5)
    with RecordOps() as rec:
        out = decode(_fake_logits(), tokens, num_steps=4, mask_token_id=MASK, draw="cdf", generator=g)
    assert not (rec.ops & SYNC_OPS), rec.ops & SYNC_OPS
    used = torch.Generator().manual_seed(5)
    torch.rand(4 * 2 * 2 * 16, generator=used)  # 4 steps x (token + noise) x 2 images x 16 positions
    assert torch.equal(g.get_state(), used.get_state())
    assert out[0, 0, 0] == 3 and (out != MASK).all()
    again = decode(_fake_logits(), tokens, num_steps=4, mask_token_id=MASK, draw="cdf",
                   generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again)


def test_same_noise_same_tokens():
    """Two runs fed the same random stream decide the same tokens (what graph capture relies on)."""
    tokens = torch.full((2, 4, 4), MASK)
    runs = [decode(_fake_logits(), tokens, num_steps=5, mask_token_id=MASK, draw="gumbel",
                   generator=torch.Generator().manual_seed(11)) for _ in range(2)]
    assert torch.equal(*runs)


def _halton_order(height, width):
    """Positions in first-visit order of the 2-D Halton sequence (base 2 rows, base 3 columns, from k = 1), in
    exact rational arithmetic: what Halton-MaskGIT's build_halton_mask lists (until every cell is visited)."""
    from fractions import Fraction

    def radical_inverse(k, base):
        out, scale = Fraction(0), Fraction(1, base)
        while k:
            out += (k % base) * scale
            k, scale = k // base, scale / base
        return out

    order, seen, k = [], set(), 1
    while len(order) < height * width:
        cell = int(radical_inverse(k, 2) * height) * width + int(radical_inverse(k, 3) * width)
        if cell not in seen:
            seen.add(cell)
            order.append(cell)
        k += 1
    return order


@pytest.mark.parametrize("shape", [(4, 4), (8, 8), (5, 7), (16, 12), (1, 3)])
def test_halton_priority_is_the_halton_visit_order(shape):
    from amused.sampling import halton_priority

    priority = halton_priority(*shape)
    assert priority.shape == (shape[0] * shape[1],) and priority.dtype == torch.float32
    assert torch.argsort(priority, descending=True).tolist() == _halton_order(*shape)


def test_halton_order_reveals_by_position_and_makes_no_host_sync():
    """order="halton": the schedule's counts as before, the revealed positions the Halton order's first ones
    (among the unknown), whatever the model's confidence; no sync op on the on-device path."""
    from amused.sampling import halton_priority

    tokens = torch.full((2, 8, 8), MASK)
    tokens[1, 0] = 3  # a known row: the order goes on among the unknown positions
    revealed = []
    with RecordOps() as rec:
        out = decode(_fake_logits(), tokens, num_steps=5, mask_token_id=MASK, draw="gumbel", order="halton",
                     generator=torch.Generator().manual_seed(0),
                     callback=lambda i, r: revealed.append(r.tokens != MASK))
    assert not (rec.ops & SYNC_OPS), rec.ops & SYNC_OPS
    assert (out != MASK).all()
    rank = torch.argsort(torch.argsort(halton_priority(8, 8), descending=True))  # position -> place in the order
    for step in revealed[:-1]:
        for b in range(2):
            new = step[b] & (tokens[b].flatten() == MASK)
            unknown_rank = rank[tokens[b].flatten() == MASK]
            assert set(rank[new].tolist()) == set(unknown_rank.sort().values[:int(new.sum())].tolist())
    with pytest.raises(ValueError, match="order must be one of confidence, halton"):
        decode(_fake_logits(), tokens, num_steps=2, mask_token_id=MASK, order="random")
