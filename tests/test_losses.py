"""GRPO advantages and the importance-corrected loss, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from learner.losses import (LossConfig, MODES, add_stats, finalize_stats, grpo_advantages, policy_loss,
                            selected_logprobs, token_logprobs)

torch.set_num_threads(1)
ln = math.log


# --------------------------------------------------------------------------- advantages
def test_advantages_std_norm_on_and_off():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # mean 0.5, centred ±0.5, unbiased std = sqrt(4·0.25/3) = 0.57735
    a = grpo_advantages(r, std_norm=True)
    assert torch.allclose(a, torch.tensor([0.866025, -0.866025, -0.866025, 0.866025]), atol=1e-5)
    assert torch.allclose(grpo_advantages(r, std_norm=False), torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_advantages_degenerate_groups_and_rows():
    assert torch.equal(grpo_advantages(torch.tensor([1.0, 1.0, 1.0])), torch.zeros(3))  # no signal
    assert torch.equal(grpo_advantages(torch.tensor([3.0])), torch.zeros(1))  # group of one
    rows = grpo_advantages(torch.tensor([[0.0, 2.0], [5.0, 5.0]]), std_norm=False)
    assert torch.allclose(rows, torch.tensor([[-1.0, 1.0], [0.0, 0.0]]))  # one group per row


# --------------------------------------------------------------------------- off-policy case
def _batch():
    """Two sequences, 4 positions; position 0 is a prompt token (mask 0, garbage values).

    Row 0 (A = +1):   u = π_θ/π_prox = [1.1, 1.5, 0.7];  π_prox/μ = [0.8, 2.5, 1.0]
    Row 1 (A = −0.5): u = [1.0, 1.0, 1.0];               π_prox/μ = [4.0, 4.0, 1.0]
    """
    prox = torch.log(torch.tensor([[0.9, 0.4, 0.2, 0.5], [0.9, 0.1, 0.2, 0.3]]))
    u = torch.tensor([[7.0, 1.1, 1.5, 0.7], [7.0, 1.0, 1.0, 1.0]])
    pb = torch.tensor([[1e-9, 0.8, 2.5, 1.0], [1e-9, 4.0, 4.0, 1.0]])
    logp = (prox + torch.log(u)).requires_grad_(True)
    behav = prox - torch.log(pb)
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.uint8)
    adv = torch.tensor([[1.0], [-0.5]])
    return logp, behav, prox, mask, adv


CFG = dict(tis_cap=2.0, eps_low=0.2, eps_high=0.28, seq_delta=2.0)


def _run(mode, **kw):
    logp, behav, prox, mask, adv = _batch()
    loss, stats = policy_loss(logp, behav, mask, adv, LossConfig(correction=mode, **CFG), prox_logp=prox, **kw)
    loss.backward()
    return loss.item(), logp.grad, finalize_stats(add_stats({}, stats))


def test_surrogate_clipping_none_mode():
    # row 0 (A=+1): min(u, clip(u, .8, 1.28)) = [1.1, 1.28 (clipped), 0.7]      → −[1.1, 1.28, 0.7]
    # row 1 (A=−.5): u = 1 → −(−0.5) = +0.5 each
    loss, grad, st = _run("none")
    assert loss == pytest.approx((-(1.1 + 1.28 + 0.7) + 3 * 0.5) / 6, abs=1e-5)
    # d/dlogp of −w·u·A = −w·A·u where unclipped, 0 where clipped; ÷ 6 tokens
    exp_grad = torch.tensor([[0, -1.1, 0.0, -0.7], [0, 0.5, 0.5, 0.5]]) / 6
    assert torch.allclose(grad, exp_grad, atol=1e-6)
    assert st["clip_frac"] == pytest.approx(1 / 6)
    assert st["is_weight_mean"] == 1.0 and st["trunc_frac"] == 0.0


def test_decoupled_weights_are_prox_over_behaviour_truncated():
    # w = min(π_prox/μ, 2): row 0 [0.8, 2.0, 1.0], row 1 [2.0, 2.0, 1.0]
    # row 0 terms −w·s: −[0.8·1.1, 2·1.28, 1·0.7] = −[0.88, 2.56, 0.7]; row 1: +[1.0, 1.0, 0.5]
    loss, grad, st = _run("decoupled")
    assert loss == pytest.approx((-(0.88 + 2.56 + 0.7) + 2.5) / 6, abs=1e-5)
    exp_grad = torch.tensor([[0, -0.88, 0.0, -0.7], [0, 1.0, 1.0, 0.5]]) / 6
    assert torch.allclose(grad, exp_grad, atol=1e-6)
    assert st["is_weight_mean"] == pytest.approx((0.8 + 2 + 1 + 2 + 2 + 1) / 6)
    assert st["is_weight_max"] == pytest.approx(2.0)
    assert st["trunc_frac"] == pytest.approx(3 / 6)
    # behaviour-vs-learner KL, k3 with r = π_prox/μ: r − 1 − ln r
    k3 = [0.8 - 1 - ln(0.8), 2.5 - 1 - ln(2.5), 0.0, 4 - 1 - ln(4), 4 - 1 - ln(4), 0.0]
    assert st["behav_kl"] == pytest.approx(sum(k3) / 6, rel=1e-5)


def test_tis_weights_use_current_policy_over_behaviour():
    # w = min(π_θ/μ, 2) = min(u·π_prox/μ, 2): row 0 [0.88, 2 (3.75), 0.7], row 1 [2 (4), 2 (4), 1]
    loss, grad, st = _run("tis")
    row0 = -(0.88 * 1.1 + 2.0 * 1.28 + 0.7 * 0.7)
    row1 = 0.5 * (2 + 2 + 1)
    assert loss == pytest.approx((row0 + row1) / 6, abs=1e-5)
    exp_grad = torch.tensor([[0, -0.88 * 1.1, 0.0, -0.7 * 0.7], [0, 1.0, 1.0, 0.5]]) / 6
    assert torch.allclose(grad, exp_grad, atol=1e-6)  # w is a stop-gradient weight
    assert st["trunc_frac"] == pytest.approx(3 / 6)
    assert st["is_weight_max"] == pytest.approx(2.0)


def test_seq_mask_drops_sequences_outside_delta():
    # row 0: geomean(0.8, 2.5, 1) = 2^(1/3)·... = exp((ln .8 + ln 2.5)/3) = 1.26 ∈ [0.5, 2] → kept
    # row 1: geomean(4, 4, 1) = 16^(1/3) = 2.52 > 2 → dropped (its tokens still count in the mean)
    loss, grad, st = _run("seq_mask")
    assert loss == pytest.approx(-(1.1 + 1.28 + 0.7) / 6, abs=1e-5)
    assert torch.allclose(grad[1], torch.zeros(4))
    assert st["seq_drop_frac"] == pytest.approx(0.5)
    assert st["is_weight_mean"] == pytest.approx(0.5) and st["trunc_frac"] == pytest.approx(0.5)


def test_masked_positions_never_matter():
    logp, behav, prox, mask, adv = _batch()
    cfg = LossConfig(correction="decoupled", **CFG)
    base, _ = policy_loss(logp, behav, mask, adv, cfg, prox_logp=prox)
    behav2, prox2 = behav.clone(), prox.clone()
    behav2[:, 0], prox2[:, 0] = -80.0, 30.0  # absurd values at the prompt position
    other, _ = policy_loss(logp, behav2, mask, adv, cfg, prox_logp=prox2)
    assert other.item() == pytest.approx(base.item())


def test_k3_kl_to_reference():
    logp = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.5, 0.25]]))
    mask = torch.tensor([[0, 1]])
    cfg = LossConfig(correction="none", kl_coef=0.1)
    loss, st = policy_loss(logp, logp.detach(), mask, torch.zeros(1, 1), cfg, ref_logp=ref)
    # r = ln(0.25/0.5) = −ln 2; k3 = e^r − r − 1 = 0.5 + ln 2 − 1 = 0.193147
    assert loss.item() == pytest.approx(0.1 * (0.5 + ln(2) - 1), rel=1e-5)
    assert finalize_stats(add_stats({}, st))["ref_kl"] == pytest.approx(0.5 + ln(2) - 1, rel=1e-5)
    loss.backward()  # d k3 / d logp = 1 − e^r = 0.5
    assert logp.grad[0, 1].item() == pytest.approx(0.1 * 0.5, rel=1e-5)


# --------------------------------------------------------------------------- on-policy limit
@pytest.mark.parametrize("mode", MODES)
def test_on_policy_every_mode_is_plain_grpo(mode):
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]])
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.5]), std_norm=True).unsqueeze(-1)

    logp, _ = token_logprobs(logits, tokens)
    plain = -(adv * logp * mask).sum() / mask.sum()  # REINFORCE form of GRPO with one update
    (g_plain,) = torch.autograd.grad(plain, logits)

    logp, _ = token_logprobs(logits, tokens)
    # μ = π_prox = π_θ: the actor sampled from exactly the policy being trained
    loss, st = policy_loss(logp, logp.detach(), mask, adv, LossConfig(correction=mode, kl_coef=0.01),
                           prox_logp=logp.detach(), ref_logp=logp.detach())
    (g,) = torch.autograd.grad(loss, logits)
    assert loss.item() == pytest.approx(-(adv * mask).sum().item() / mask.sum().item(), abs=1e-6)
    assert torch.allclose(g, g_plain, atol=1e-7)
    s = finalize_stats(add_stats({}, st))
    assert s["clip_frac"] == 0.0 and s["is_weight_mean"] == pytest.approx(1.0) and s["behav_kl"] == pytest.approx(0.0)


def test_micro_batches_with_global_denominator_sum_to_full_batch():
    torch.manual_seed(1)
    logp0 = torch.randn(4, 5).clamp(max=0)
    mask = (torch.rand(4, 5) > 0.3).int()
    behav = logp0 - 0.3 * torch.rand(4, 5)
    adv = torch.randn(4, 1)
    cfg = LossConfig(correction="tis")
    full = logp0.clone().requires_grad_(True)
    policy_loss(full, behav, mask, adv, cfg)[0].backward()
    parts = logp0.clone().requires_grad_(True)
    denom = mask.sum()
    for rows in (slice(0, 1), slice(1, 4)):
        policy_loss(parts[rows], behav[rows], mask[rows], adv[rows], cfg, denom=denom)[0].backward()
    assert torch.allclose(full.grad, parts.grad, atol=1e-7)


# --------------------------------------------------------------------------- log-probs
def test_token_logprobs_and_entropy_match_direct_computation():
    torch.manual_seed(2)
    logits = torch.randn(2, 7, 13)
    tokens = torch.randint(0, 13, (2, 7))
    lp, ent = token_logprobs(logits, tokens, with_entropy=True, chunk=3)
    ls = torch.log_softmax(logits, -1)
    direct = ls[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    assert torch.allclose(lp[:, 1:], direct, atol=1e-6) and torch.all(lp[:, 0] == 0)
    direct_ent = -(ls.exp() * ls).sum(-1)[:, :-1]
    assert torch.allclose(ent[:, 1:], direct_ent, atol=1e-5)


def test_selected_logprobs_equal_full_ones_at_the_selected_positions():
    torch.manual_seed(3)
    logits = torch.randn(3, 9, 17)
    tokens = torch.randint(0, 17, (3, 9))
    rows, cols = torch.nonzero(torch.rand(3, 8) > 0.5, as_tuple=True)
    full_lp, full_ent = token_logprobs(logits, tokens, with_entropy=True)
    lp, ent = selected_logprobs(logits[rows, cols], tokens[rows, cols + 1], with_entropy=True, chunk=4)
    assert torch.allclose(lp, full_lp[rows, cols + 1], atol=1e-6)
    assert torch.allclose(ent, full_ent[rows, cols + 1], atol=1e-5)
    # no selected position (an empty micro-batch): the result is still part of the graph
    lp0, _ = selected_logprobs(torch.zeros((0, 17), requires_grad=True) * 2, torch.zeros(0, dtype=torch.long))
    assert lp0.shape == (0,) and lp0.requires_grad


def test_head_on_runs_the_output_head_on_the_selected_positions_only():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from learner.trainer import head_on

    torch.manual_seed(4)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    tokens = torch.randint(0, 50, (2, 6))
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([1, 4, 2])
    head = model.get_output_embeddings()
    seen = []
    head.register_forward_hook(lambda _m, _args, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        full = model(input_ids=tokens).logits
        with head_on(head, rows, cols):
            part = model(input_ids=tokens).logits
        again = model(input_ids=tokens).logits
    assert seen == [(2, 6, 50), (3, 50), (2, 6, 50)]  # logits for 3 positions only; then all again
    assert torch.allclose(part, full[rows, cols], atol=1e-5) and torch.equal(again, full)
    assert "forward" not in head.__dict__
