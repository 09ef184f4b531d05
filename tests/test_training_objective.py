"""The training objective and optimizer pieces: masking, masked loss, text dropout, EMA, LR, fused steps."""

import math

import pytest
import torch

from amused.training.ema import EMA
from amused.training.masking import drop_text, mask_tokens, masked_loss
from amused.training.optim import FusedStepOptimizer, adamw_factory, lr_lambda, make_lr_scheduler, \
    stochastic_round_bf16


def test_mask_counts_follow_the_cosine_schedule():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (4000, 4, 4), generator=g)
    batch = mask_tokens(ids, 23, generator=g)
    counts = batch.mask.flatten(1).sum(1)
    assert counts.min() >= 1 and counts.max() <= 16
    assert torch.equal(batch.input_ids[batch.mask], torch.full_like(batch.input_ids[batch.mask], 23))
    assert torch.equal(batch.input_ids[~batch.mask], ids[~batch.mask])
    # E[cos(pi/2 u)] = 2/pi for u ~ U(0, 1)
    assert abs(counts.float().mean().item() / 16 - 2 / math.pi) < 0.02
    floored = mask_tokens(ids, 23, min_masking_rate=0.5, generator=g).mask.flatten(1).sum(1)
    assert floored.min() >= 8


def test_masked_loss_ignores_unmasked_positions():
    labels = torch.randint(0, 16, (2, 4, 4))
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = mask[1, 2, 3] = True
    logits = torch.randn(2, 16, 4, 4)
    logits[0, :, 0, 0] = -100
    logits[0, labels[0, 0, 0], 0, 0] = 100  # right
    logits[1, :, 2, 3] = -100
    logits[1, (labels[1, 2, 3] + 1) % 16, 2, 3] = 100  # wrong
    out = masked_loss(logits, labels, mask, label_smoothing=0.0)
    assert out.accuracy.item() == 0.5
    assert abs(out.loss.item() - 100.0) < 1.0  # (0 + 200) / 2: only the two masked positions count
    logits[~mask[:, None].expand_as(logits)] = torch.randn(int((~mask).sum()) * 16)
    assert abs(masked_loss(logits, labels, mask, 0.0).loss.item() - out.loss.item()) < 1e-4


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_text_dropout_really_drops_at_the_given_rate(p):
    g = torch.Generator().manual_seed(1)
    n = 20000
    hidden, pooled = torch.randn(n, 3, 4, generator=g) + 5, torch.randn(n, 4, generator=g) + 5
    empty_h, empty_p = torch.zeros(1, 3, 4), torch.zeros(1, 4)
    h, q, dropped = drop_text(hidden, pooled, empty_h, empty_p, p, generator=g)
    assert abs(dropped.float().mean().item() - p) < 0.01  # the reference keeps text with probability p instead
    assert torch.equal(h[dropped], empty_h.expand(int(dropped.sum()), -1, -1))
    assert torch.equal(q[dropped], empty_p.expand(int(dropped.sum()), -1))
    assert torch.equal(h[~dropped], hidden[~dropped]) and torch.equal(q[~dropped], pooled[~dropped])


def test_text_dropout_rejects_bad_rate():
    with pytest.raises(ValueError, match="cond_dropout_prob"):
        drop_text(torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.zeros(1, 1, 1), torch.zeros(1, 1), 1.5)


def test_ema_with_low_decay_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([0.0]))
    ema = EMA([("w", w)], decay=0.5)
    values, shadow = [1.0, 2.0, 3.0], 0.0
    for n, v in enumerate(values, 1):
        with torch.no_grad():
            w.fill_(v)
        ema.update()
        d = min(0.5, (1 + n) / (10 + n))
        shadow = d * shadow + (1 - d) * v
    assert abs(ema.shadow[0].item() - shadow) < 1e-6
    restored = EMA([("w", w)], decay=0.5)
    restored.load_state_dict(ema.state_dict())
    restored.copy_to()
    assert abs(w.item() - shadow) < 1e-6 and restored.num_updates == 3


def test_lr_schedules_warm_up_then_decay():
    cos = lr_lambda("cosine", warmup_steps=10, total_steps=110)
    assert cos(0) < cos(5) < cos(9) <= 1.0 and cos(10) == 1.0
    assert abs(cos(60) - 0.5) < 1e-9 and cos(110) < 1e-9
    assert lr_lambda("constant", 0, 100)(99) == 1.0 and lr_lambda("linear", 0, 100)(50) == 0.5
    with pytest.raises(ValueError, match="lr_scheduler"):
        lr_lambda("poly", 0, 1)


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200000,), 1.0 + 1e-3)  # between bf16 neighbours 1.0 and 1.0078125
    assert x.to(torch.bfloat16).float().mean().item() == 1.0  # nearest rounding loses the increment
    mean = stochastic_round_bf16(x).float().mean().item()
    assert abs(mean - (1.0 + 1e-3)) < 1e-4
    y = -torch.rand(1000) * 3
    r = stochastic_round_bf16(y).float()
    assert ((r - y).abs() <= y.abs() * 2 ** -7).all()  # within one bf16 ulp, sign kept


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def test_fused_optimizer_step_equals_plain_adamw_with_accumulation_and_schedule():
    data = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    make = adamw_factory(False, torch.device("cpu"), lr=1e-2)
    plain, fused = _model(), _model()
    opt = make(list(plain.parameters()))
    sched = make_lr_scheduler(opt, "cosine", 2, 4)
    fopt = FusedStepOptimizer(fused.parameters(), make)
    fsched = make_lr_scheduler(fopt, "cosine", 2, 4)
    for i, x in enumerate(data):  # 2 micro-batches per step
        sync = i % 2 == 1
        plain(x).pow(2).mean().div(2).backward()
        fopt.sync = sync
        fused(x).pow(2).mean().div(2).backward()
        if sync:
            opt.step()
            opt.zero_grad()
            sched.step()
            fopt.step()
            fsched.step()
            assert all(p.grad is None for p in fused.parameters())  # freed inside backward
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    state = fopt.state_dict()
    again = FusedStepOptimizer(_model().parameters(), make)
    again.load_state_dict(state)
    assert again.param_groups[0]["lr"] == fopt.param_groups[0]["lr"]


def test_fused_step_with_bf16_weights_moves_norm_gains():
    """With bf16 weights at lr 1e-4 a gain of 1.0 never moves under nearest rounding; stochastic rounding does."""
    results = {}
    for sr in (False, True):
        torch.manual_seed(0)
        gain = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = FusedStepOptimizer([gain], adamw_factory(False, torch.device("cpu"), lr=1e-4, weight_decay=0.0),
                                 stochastic_rounding=sr)
        assert opt.stochastic_rounding == sr
        for _ in range(20):
            (gain.float() * 1.0).sum().backward()  # gradient +1 everywhere: Adam moves each weight by -lr
        results[sr] = gain.float().mean().item()
    assert results[False] == 1.0
    assert abs(results[True] - (1 - 20e-4)) < 3e-4
