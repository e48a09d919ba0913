"""GRPO objective with importance corrections for asynchronous (off-policy) data.

    rewards [n] per group ──grpo_advantages──▶ A per sample ──(every generated token)──┐
    logits ──token_logprobs──▶ log π_θ, entropy                                        │
      (the learner: selected_logprobs, on loss-mask positions only)                    │
    actor's logprobs ────────▶ log μ            ──policy_loss(mode)──▶ loss, stat sums ◀┘
    learner at step start ───▶ log π_prox  (None: one update per step, π_prox ≡ π_θ)

Symbols: μ = behaviour policy (the actor's engine), π_prox = the learner's policy at the start
of the step (recomputed, no gradient), π_θ = the policy being trained, u = π_θ / π_prox.

Every mode optimises the clipped GRPO surrogate  s_t = min(u·A, clip(u, 1-ε_low, 1+ε_high)·A)
times a stop-gradient weight w_t:

    none       w = 1
    tis        w = min(π_θ/μ, C)                         (token-level truncated IS)
    decoupled  w = min(π_prox/μ, C)                      (AReaL decoupled PPO)
    seq_mask   w = 1 if geomean_t(π_prox/μ) ∈ [1/δ, δ] else 0   (per sequence)

With one optimizer update per step (the default) u ≡ 1 in value, so s_t is exactly the policy
gradient term −A·∇log π_θ; with several updates the clip bounds the later ones. When every
token is on-policy (μ = π_prox = π_θ) all weights are 1 and all modes equal plain GRPO.

Loss = Σ_t mask_t · (−w_t·s_t + β·k3_t) / denom: token-mean over loss-mask tokens, where
`denom` is the number of loss-mask tokens in the whole batch (all micro-batches, all ranks), so
accumulating micro-batch gradients gives exactly the gradient of the full-batch token mean.
Sequences dropped by `seq_mask` keep counting in `denom` (their tokens contribute zero).
k3_t = exp(r) − r − 1 with r = log π_ref − log π_θ (low-variance KL to a frozen reference).

Statistics come back as sums (plus maxima) so micro-batches and ranks can be added up before
`finalize_stats` turns them into means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODES = ("tis", "decoupled", "seq_mask", "none")
_LOG_CLAMP = 20.0  # log-ratios are clamped to ±20 before exp (e^20 ≈ 5e8) to stay finite


@dataclass(frozen=True)
class LossConfig:
    correction: str = "decoupled"
    tis_cap: float = 2.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    seq_delta: float = 2.0
    kl_coef: float = 0.0

    def __post_init__(self):
        if self.correction not in MODES:
            raise ValueError(f"correction must be one of {MODES}, got {self.correction!r}")

    @classmethod
    def from_learner(cls, cfg) -> "LossConfig":
        return cls(correction=cfg.correction, tis_cap=cfg.tis_cap, eps_low=cfg.eps_low,
                   eps_high=cfg.eps_high, seq_delta=cfg.seq_delta, kl_coef=cfg.kl_coef)


# --------------------------------------------------------------------------- advantages
def grpo_advantages(rewards: torch.Tensor, std_norm: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages along the last dimension (one group per row).

    A_i = r_i − mean(r); with `std_norm` divided by (std(r) + eps), std with Bessel's correction
    (as verl / Search-R1). `std_norm=False` is the Dr.GRPO variant. A group of one gets 0.
    """
    r = rewards.to(torch.float32)
    centred = r - r.mean(dim=-1, keepdim=True)
    if not std_norm or r.shape[-1] < 2:
        return centred if r.shape[-1] >= 2 else torch.zeros_like(r)
    return centred / (r.std(dim=-1, keepdim=True, unbiased=True) + eps)


# --------------------------------------------------------------------------- log-probs
def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool = False,
                   chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(tokens[:, t] | tokens[:, <t]) for every position t ≥ 1 (position 0 gets 0).

    logits: [B, L, V] from a causal LM over `tokens` [B, L]: selected_logprobs over every
    position, `chunk` positions per row at a time. Entropy (no gradient) likewise.
    """
    B, L, V = logits.shape
    # position t predicts token t+1; the last position's target is a dummy and is dropped
    targets = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1).reshape(-1)
    lp, ent = selected_logprobs(logits.reshape(B * L, V), targets, with_entropy, chunk=chunk * B)
    zero = logits.new_zeros((B, 1), dtype=torch.float32)
    logp = torch.cat([zero, lp.view(B, L)[:, :-1]], dim=1)
    return logp, (torch.cat([zero, ent.view(B, L)[:, :-1]], dim=1) if with_entropy else None)


def selected_logprobs(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False,
                      chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(target_i) for N selected positions: logits [N, V] are the head's outputs at the
    positions *before* each target, targets [N]. Float32, `chunk` rows at a time; entropy (no
    gradient) from the same logsumexp."""
    lp_parts, ent_parts = [], []
    for s in range(0, max(1, logits.shape[0]), chunk):  # N = 0 still passes once: the graph stays connected
        lg = logits[s:s + chunk].float()
        lse = torch.logsumexp(lg, dim=-1)
        lp_parts.append(lg.gather(-1, targets[s:s + chunk].long().unsqueeze(-1)).squeeze(-1) - lse)
        if with_entropy:
            with torch.no_grad():
                ent_parts.append(lse - (torch.exp(lg - lse.unsqueeze(-1)) * lg).sum(-1))
    logp = torch.cat(lp_parts)
    if not with_entropy:
        return logp, None
    return logp, torch.cat(ent_parts)


# --------------------------------------------------------------------------- loss
def _weights(cfg: LossConfig, logp_d: torch.Tensor, prox: torch.Tensor, behav: torch.Tensor,
             m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Stop-gradient importance weight w per token, a truncation indicator, extra stat sums."""
    extra: dict[str, torch.Tensor] = {}
    if cfg.correction == "none":
        return torch.ones_like(prox), torch.zeros_like(prox), extra
    if cfg.correction in ("tis", "decoupled"):
        num = logp_d if cfg.correction == "tis" else prox
        raw = torch.exp((num - behav).clamp(-_LOG_CLAMP, _LOG_CLAMP))
        return raw.clamp(max=cfg.tis_cap), (raw > cfg.tis_cap).to(raw.dtype), extra
    # seq_mask: geometric mean of π_prox/μ over each row's loss-mask tokens
    n_tok = m.sum(dim=-1)
    mean_log = ((prox - behav) * m).sum(dim=-1) / n_tok.clamp(min=1.0)
    keep = (mean_log.abs() <= math.log(cfg.seq_delta)).to(prox.dtype)
    has = (n_tok > 0).to(prox.dtype)
    extra["seqs"] = has.sum()
    extra["seqs_dropped"] = (has * (1.0 - keep)).sum()
    w = keep.unsqueeze(-1).expand_as(prox)
    return w, 1.0 - w, extra


def policy_loss(logp: torch.Tensor, behav_logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor,
                cfg: LossConfig, prox_logp: torch.Tensor | None = None,
                ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                denom: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance-corrected GRPO loss over [B, L] token tensors (rows = sequences).

    logp carries the gradient; behav_logp (μ), prox_logp (π_prox), ref_logp, entropy do not.
    `adv` broadcasts against logp (per token [B, L] or per sequence [B, 1]).
    Returns (loss, stat sums) — see `finalize_stats`.
    """
    m = mask.to(logp.dtype)
    logp_d = logp.detach()
    prox = logp_d if prox_logp is None else prox_logp.detach().to(logp.dtype)
    behav = behav_logp.detach().to(logp.dtype)
    adv = adv.detach().to(logp.dtype).expand_as(logp)

    u = torch.exp((logp - prox).clamp(-_LOG_CLAMP, _LOG_CLAMP))
    surr = u * adv
    surr_clip = u.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * adv
    clipped = (surr_clip < surr).to(logp.dtype)
    w, truncated, extra = _weights(cfg, logp_d, prox, behav, m)
    per_tok = -w * torch.minimum(surr, surr_clip)

    stats: dict[str, torch.Tensor] = {}
    if cfg.kl_coef > 0 and ref_logp is not None:
        r = (ref_logp.detach().to(logp.dtype) - logp).clamp(-_LOG_CLAMP, _LOG_CLAMP)
        k3 = torch.exp(r) - r - 1.0
        per_tok = per_tok + cfg.kl_coef * k3
        stats["ref_kl_sum"] = (k3.detach() * m).sum()

    n = m.sum()
    total = (per_tok * m).sum()
    loss = total / (n.clamp(min=1.0) if denom is None else denom)

    r_pb = (prox - behav).clamp(-_LOG_CLAMP, _LOG_CLAMP)  # log π_prox/μ on μ's samples
    behav_k3 = torch.exp(r_pb) - r_pb - 1.0  # ≥ 0, estimates KL(μ ‖ π_prox)
    with torch.no_grad():
        stats.update({
            "tokens": n,
            "loss_sum": total.detach(),
            "clip_sum": (clipped * m).sum(),
            "isw_sum": (w * m).sum(),
            "isw_max": torch.where(m > 0, w, torch.zeros_like(w)).max() if w.numel() else n * 0,
            "trunc_sum": (truncated * m).sum(),
            "behav_kl_sum": (behav_k3 * m).sum(),
            "behav_logratio_sum": ((behav - prox) * m).sum(),
            "ratio_sum": (u.detach() * m).sum(),
            "adv_sum": (adv * m).sum(),
            **extra,
        })
        if entropy is not None:
            stats["entropy_sum"] = (entropy.detach().to(logp.dtype) * m).sum()
    return loss, stats


MAX_KEYS = ("isw_max",)


def add_stats(acc: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accumulate stat sums (maxima for MAX_KEYS) from one micro-batch into `acc`."""
    for k, v in new.items():
        v = v.detach().float()
        if k not in acc:
            acc[k] = v.clone()
        elif k in MAX_KEYS:
            acc[k] = torch.maximum(acc[k], v)
        else:
            acc[k] = acc[k] + v
    return acc


def finalize_stats(acc: dict[str, float]) -> dict[str, float]:
    """Sums → per-token means (and fractions). Keys absent from `acc` are left out."""
    n = max(float(acc.get("tokens", 0.0)), 1.0)
    out = {"loss_tokens": float(acc.get("tokens", 0.0))}
    for src, dst in (("loss_sum", "loss"), ("clip_sum", "clip_frac"), ("isw_sum", "is_weight_mean"),
                     ("trunc_sum", "trunc_frac"), ("behav_kl_sum", "behav_kl"),
                     ("behav_logratio_sum", "behav_logratio"), ("ratio_sum", "ratio_mean"),
                     ("adv_sum", "adv_mean"), ("entropy_sum", "entropy"), ("ref_kl_sum", "ref_kl")):
        if src in acc:
            out[dst] = float(acc[src]) / n
    if "isw_max" in acc:
        out["is_weight_max"] = float(acc["isw_max"])
    if "seqs" in acc:
        out["seq_drop_frac"] = float(acc["seqs_dropped"]) / max(float(acc["seqs"]), 1.0)
    return out
