"""GRPO math: group advantages and the decoupled-PPO policy loss with off-policy correction.

Pure functions over tensors; shapes are `[B, T]` per token and `[B]` per sequence.
Three policies meet here (AReaL's decoupled PPO): the current policy `logp` (with
grad), the proximal policy `prox_logp` (the learner's weights when the batch was
formed, the trust region's anchor) and the behaviour policy `behavior_logp` (the
engine that sampled the tokens). The PPO ratio u = pi/pi_prox is clipped; the
behaviour weight w = pi_prox/mu corrects for sampling, held constant.

Deviations from the papers, on purpose:
* Every correction is a per-token weight rho in the loss (TIS: min(w, C); MIS and
  geo_mask: 0 or 1). A rejected token contributes 0 but stays in the normalisers,
  so the loss scale never depends on what was rejected (verl instead drops
  rejected tokens from the mask, which renormalises).
* A sequence-level ratio is exp(mean log w) over the sequence's tokens, never exp(sum).
* The KL term to the reference is a regulariser on every valid token, not IS-weighted.
* Group std is the unbiased (n-1) std as in DeepSeekMath/TRL; a one-sample group has std 0.

The total loss is a weighted sum `sum(coef * token_loss)`: `aggregation_weights`
gives `coef`, so a chunked caller (learner/loss.py) can add chunks independently.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from configs.schema import LossConfig

IS_MODES = ("none", "token_tis", "seq_tis", "token_mis", "geo_mask")
POLICY_LOSSES = ("ppo", "gspo", "cispo")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
ADV_MODES = ("grpo", "drgrpo")

# One line per metric that policy_loss returns (docs/metrics.md can be generated from it).
METRIC_HELP = {
    "loss": "total loss (policy term + kl_coef * KL), as aggregated by loss_agg",
    "pg_loss": "policy-gradient term alone, aggregated like the loss",
    "kl": "mean per-token KL estimate (kl_estimator) to the reference policy (only with ref_logp)",
    "clip_frac": "fraction of valid tokens where the clipped surrogate is active (no gradient from them)",
    "dual_clip_frac": "fraction of valid tokens capped by the dual clip (0 when dual_clip is None)",
    "is_weight_mean": "mean of the raw behaviour weight w = pi_prox/mu over valid tokens",
    "is_weight_max": "max of w over valid tokens",
    "is_capped_frac": "fraction of valid tokens whose TIS weight was truncated at is_cap",
    "is_masked_frac": "fraction of valid tokens rejected (weight 0) by token_mis or geo_mask",
    "mismatch_kl": "KL(mu || pi_prox) estimate mean(w - 1 - log w): how far the engine is from the learner",
    "entropy": "mean per-token entropy of the current policy (only when entropy is given)",
    "seq_ratio_mean": "gspo only: mean over sequences of the sequence ratio exp(mean log(pi/pi_prox))",
    "tokens": "number of valid (loss-mask) tokens",
}


class Correction(NamedTuple):
    """Behaviour-policy correction of one batch, all `[B, T]` and constant (no grad)."""

    rho: Tensor  # weight on each token's policy term
    log_w: Tensor  # log(pi_prox / mu), 0 on invalid tokens
    capped: Tensor  # bool: TIS truncated this token's weight
    rejected: Tensor  # bool: MIS / geo_mask gave this token weight 0


class TokenLoss(NamedTuple):
    """Per-token pieces of the loss (shape of logp)."""

    total: Tensor  # rho * pg + kl_coef * kl
    pg: Tensor  # rho * clipped surrogate
    kl: Optional[Tensor]  # KL estimate to the reference, or None
    clipped: Tensor  # bool
    dual_clipped: Tensor  # bool


# ---------------------------------------------------------------- advantages


def _check_groups(rewards: Tensor, group_index: Tensor) -> None:
    if not isinstance(rewards, Tensor) or not isinstance(group_index, Tensor):
        raise TypeError("rewards and group_index must be torch tensors")
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(f"rewards and group_index must both be [N]; got {tuple(rewards.shape)} and {tuple(group_index.shape)}")
    if group_index.dtype.is_floating_point or group_index.dtype == torch.bool:
        raise ValueError(f"group_index must be an integer tensor, got {group_index.dtype}")
    if rewards.numel() and not torch.isfinite(rewards.double()).all():
        raise ValueError("rewards contain NaN or inf")


def _group_stats(rewards: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rewards in float64, inverse index into groups, per-group counts)."""
    _, inv, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    return rewards.double(), inv, counts


def group_advantages(rewards: Tensor, group_index: Tensor, mode: str = "grpo", eps: float = 1e-6) -> Tensor:
    """Per-sample advantages `[N]` from rewards `[N]` and any integer group labels `[N]`.

    "grpo": (r - mean_g) / (std_g + eps) with the unbiased std; "drgrpo": r - mean_g.
    Returned in the rewards' dtype (float32 for integer rewards).
    """
    _check_groups(rewards, group_index)
    if mode not in ADV_MODES:
        raise ValueError(f"mode must be one of {ADV_MODES}, got {mode!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    out_dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.float32
    if rewards.numel() == 0:
        return rewards.to(out_dtype)
    r, inv, counts = _group_stats(rewards, group_index)
    mean = torch.zeros(len(counts), dtype=r.dtype, device=r.device).index_add_(0, inv, r) / counts
    dev = r - mean[inv]
    if mode == "drgrpo":
        return dev.to(out_dtype)
    sq = torch.zeros_like(mean).index_add_(0, inv, dev * dev)
    std = (sq / (counts - 1).clamp(min=1)).sqrt()
    return (dev / (std[inv] + eps)).to(out_dtype)


def zero_variance_groups(rewards: Tensor, group_index: Tensor, tol: float = 1e-6) -> tuple[Tensor, int]:
    """Find groups whose rewards all agree (max - min <= tol): they carry no GRPO signal.

    Returns (bool mask `[N]` of the samples in such groups, number of such groups), so the
    trainer can drop them with `~mask` and log the count.
    """
    _check_groups(rewards, group_index)
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=rewards.device), 0
    r, inv, counts = _group_stats(rewards, group_index)
    hi = torch.full((len(counts),), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amax")
    lo = torch.full((len(counts),), torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amin")
    flat = (hi - lo) <= tol
    return flat[inv], int(flat.sum())


# ---------------------------------------------------------------- loss pieces


def check_loss_config(cfg: LossConfig) -> None:
    """Raise ValueError when a LossConfig (possibly built by hand, bypassing the loader) is unusable."""
    if cfg.is_mode not in IS_MODES:
        raise ValueError(f"is_mode must be one of {IS_MODES}, got {cfg.is_mode!r}")
    if cfg.policy_loss not in POLICY_LOSSES:
        raise ValueError(f"policy_loss must be one of {POLICY_LOSSES}, got {cfg.policy_loss!r}")
    if cfg.entropy_coef < 0 or cfg.kl_in_reward < 0:
        raise ValueError(f"need entropy_coef >= 0 and kl_in_reward >= 0, got {cfg.entropy_coef}, {cfg.kl_in_reward}")
    if cfg.loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {cfg.loss_agg!r}")
    if cfg.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {cfg.kl_estimator!r}")
    if not 0.0 <= cfg.clip_low < 1.0 or cfg.clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {cfg.clip_low}, {cfg.clip_high}")
    if cfg.dual_clip is not None and not cfg.dual_clip > 1.0:
        raise ValueError(f"dual_clip must be None or > 1, got {cfg.dual_clip}")
    if cfg.is_cap < 1.0:
        raise ValueError(f"is_cap must be >= 1, got {cfg.is_cap}")
    # w = 1 on-policy must be kept, or the on-policy loss would not be plain GRPO.
    if not 0.0 <= cfg.is_low <= 1.0 <= cfg.is_high:
        raise ValueError(f"need 0 <= is_low <= 1 <= is_high, got {cfg.is_low}, {cfg.is_high}")
    if cfg.max_len < 1 or cfg.kl_coef < 0:
        raise ValueError(f"need max_len >= 1 and kl_coef >= 0, got {cfg.max_len}, {cfg.kl_coef}")


def _seq_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of x over each row's valid tokens `[B]` (0 for an empty row)."""
    return (x * valid).sum(-1) / valid.sum(-1).clamp(min=1)


def behavior_correction(prox_logp: Tensor, behavior_logp: Tensor, mask: Tensor, cfg: LossConfig) -> Correction:
    """Per-token weights rho from w = pi_prox / mu under cfg.is_mode (no grad)."""
    with torch.no_grad():
        valid = mask != 0
        vf = valid.to(prox_logp.dtype)
        log_w = torch.where(valid, prox_logp - behavior_logp, torch.zeros_like(prox_logp))
        no = torch.zeros_like(valid)
        mode = cfg.is_mode
        if mode == "none":
            return Correction(torch.ones_like(log_w), log_w, no, no)
        if mode in ("seq_tis", "geo_mask"):  # sequence ratio: exp of the MEAN log ratio
            w = torch.exp(_seq_mean(log_w, vf))[:, None].expand_as(log_w)
        else:
            w = torch.exp(log_w)
        if mode in ("token_tis", "seq_tis"):
            return Correction(w.clamp(max=cfg.is_cap), log_w, valid & (w > cfg.is_cap), no)
        keep = (w >= cfg.is_low) & (w <= cfg.is_high)
        return Correction(keep.to(log_w.dtype), log_w, no, valid & ~keep)


def aggregation_weights(mask: Tensor, cfg: LossConfig, dtype: torch.dtype = torch.float32) -> Tensor:
    """coef `[B, T]` with loss = sum(coef * token_loss) for cfg.loss_agg.

    A sequence counts in the seq-mean aggregations when it has at least one valid token.
    """
    m = (mask != 0).to(dtype)
    n_tok = m.sum(-1)
    if cfg.loss_agg == "token-mean":
        return m / n_tok.sum().clamp(min=1)
    n_seq = (n_tok > 0).sum().clamp(min=1)
    if cfg.loss_agg == "seq-mean-token-mean":
        return m / n_tok.clamp(min=1)[:, None] / n_seq
    return m / float(cfg.max_len) / n_seq  # Dr.GRPO: a fixed length, not the sequence's own


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Schulman's per-token estimators of KL(pi || pi_ref) for tokens sampled from pi."""
    d = ref_logp - logp  # log(pi_ref / pi)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1.0


def sequence_ratio(logp: Tensor, prox_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO's s_i = exp(mean over the sequence's loss tokens of log(pi / pi_prox)), `[B]`, no grad."""
    with torch.no_grad():
        valid = (mask != 0).to(logp.dtype)
        return torch.exp(_seq_mean(torch.where(mask != 0, logp - prox_logp, 0.0), valid))


def token_losses(logp: Tensor, prox_logp: Tensor, adv: Tensor, rho: Tensor, cfg: LossConfig, ref_logp: Optional[Tensor] = None,
                 seq_ratio: Optional[Tensor] = None) -> TokenLoss:
    """Elementwise loss of each token; `adv` broadcasts against logp (e.g. `[B, 1]`).

    Elementwise in logp, so it can be evaluated on any slice of the tokens (chunks). For gspo,
    `seq_ratio` is each token's sequence ratio s_i (constant, `sequence_ratio`): the token's ratio is
    s_i * exp(logp - sg(logp)), worth s_i with gradient s_i * dlogp (GSPO-token), so the sequence's
    tokens summed with weight 1/|y_i| (seq-mean-token-mean) give GSPO's sequence-level gradient.
    For cispo the clipped ratio is a constant weight on logp (CISPO, MiniMax-M1): clipped tokens keep
    their gradient, only its size is bounded.
    """
    if cfg.policy_loss == "gspo":
        if seq_ratio is None:
            raise ValueError("policy_loss=gspo needs seq_ratio")
        u = seq_ratio.detach() * torch.exp(logp - logp.detach())
    else:
        u = torch.exp(logp - prox_logp.detach())
    w = u.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    if cfg.policy_loss == "cispo":
        clipped = w.detach() != u.detach()
        pg = -(w.detach() * adv * logp)
        dual_clipped = torch.zeros_like(clipped)
        pg = rho * pg
        kl = None if ref_logp is None else kl_estimate(logp, ref_logp.detach(), cfg.kl_estimator)
        total = pg if (kl is None or cfg.kl_coef == 0) else pg + cfg.kl_coef * kl
        return TokenLoss(total, pg, kl, clipped, dual_clipped)
    surr = u * adv
    surr_clip = w * adv
    clipped = surr_clip < surr
    pg = -torch.minimum(surr, surr_clip)
    dual_clipped = torch.zeros_like(clipped)
    if cfg.dual_clip is not None:
        cap = -cfg.dual_clip * adv  # > 0 where adv < 0
        dual_clipped = (adv < 0) & (pg > cap)
        pg = torch.where(dual_clipped, cap.expand_as(pg), pg)
    pg = rho * pg
    kl = None if ref_logp is None else kl_estimate(logp, ref_logp.detach(), cfg.kl_estimator)
    total = pg if (kl is None or cfg.kl_coef == 0) else pg + cfg.kl_coef * kl
    return TokenLoss(total, pg, kl, clipped, dual_clipped)


def check_loss_inputs(logp: Tensor, prox_logp: Tensor, behavior_logp: Tensor, advantages: Tensor, mask: Tensor,
                      cfg: LossConfig, ref_logp: Optional[Tensor], entropy: Optional[Tensor]) -> None:
    """Shapes, dtypes and NaNs of policy_loss's inputs; ValueError naming the culprit."""
    check_loss_config(cfg)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got {tuple(logp.shape)}")
    named = {"prox_logp": prox_logp, "behavior_logp": behavior_logp, "mask": mask, "ref_logp": ref_logp, "entropy": entropy}
    for name, t in named.items():
        if t is not None and tuple(t.shape) != tuple(logp.shape):
            raise ValueError(f"{name} must have logp's shape {tuple(logp.shape)}, got {tuple(t.shape)}")
    if tuple(advantages.shape) != (logp.shape[0],):
        raise ValueError(f"advantages must be [B] = [{logp.shape[0]}], got {tuple(advantages.shape)}")
    for name, t in {"logp": logp, "prox_logp": prox_logp, "behavior_logp": behavior_logp, "advantages": advantages}.items():
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a float tensor, got {t.dtype}")
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")
    valid = mask != 0
    with torch.no_grad():
        bad = [n for n, t in {"logp": logp, "prox_logp": prox_logp, "behavior_logp": behavior_logp, "ref_logp": ref_logp}.items()
               if t is not None and torch.isnan(t[valid]).any()]
        if torch.isnan(advantages).any():
            bad.append("advantages")
    if bad:
        raise ValueError(f"NaN on loss-mask tokens in: {', '.join(bad)}")


def _zero_invalid(x: Optional[Tensor], valid: Tensor) -> Optional[Tensor]:
    """Padding may hold anything; zero it so 0 * inf never turns the loss into NaN."""
    return None if x is None else torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


def loss_metrics(tok: TokenLoss, corr: Correction, coef: Tensor, mask: Tensor, entropy: Optional[Tensor] = None,
                 seq_ratio: Optional[Tensor] = None, entropy_coef: float = 0.0) -> dict[str, Tensor]:
    """Detached 0-dim metric tensors (see METRIC_HELP); `.item()` them when logging."""
    with torch.no_grad():
        valid = mask != 0
        n = valid.sum()
        nf = n.clamp(min=1).to(coef.dtype)

        def frac(b: Tensor) -> Tensor:
            return (b & valid).sum().to(coef.dtype) / nf

        w = torch.exp(corr.log_w)
        out = {
            "loss": (coef * tok.total).sum(),
            "pg_loss": (coef * tok.pg).sum(),
            "clip_frac": frac(tok.clipped),
            "is_weight_mean": (w * valid).sum() / nf,
            "is_weight_max": torch.where(valid, w, torch.zeros_like(w)).amax() if w.numel() else w.new_zeros(()),
            "is_capped_frac": frac(corr.capped),
            "is_masked_frac": frac(corr.rejected),
            "mismatch_kl": ((w - 1.0 - corr.log_w) * valid).sum() / nf,
            "dual_clip_frac": frac(tok.dual_clipped),
            "tokens": n,
        }
        if tok.kl is not None:
            out["kl"] = (tok.kl * valid).sum() / nf
        if entropy is not None:
            out["entropy"] = (entropy * valid).sum() / nf
            if entropy_coef:
                out["loss"] = out["loss"] - entropy_coef * (coef * torch.where(valid, entropy, 0.0)).sum()
        if seq_ratio is not None:
            rows = valid.any(-1)
            out["seq_ratio_mean"] = seq_ratio[rows].mean() if bool(rows.any()) else seq_ratio.new_zeros(())
        return {k: v.detach() for k, v in out.items()}


def policy_loss(logp: Tensor, prox_logp: Tensor, behavior_logp: Tensor, advantages: Tensor, mask: Tensor, cfg: LossConfig,
                *, ref_logp: Optional[Tensor] = None, entropy: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Decoupled-PPO GRPO loss (scalar, grad to logp only) and its metrics.

    logp, prox_logp, behavior_logp, mask, ref_logp, entropy: `[B, T]`; advantages: `[B]`.
    mask: nonzero marks a loss (generated) token; values elsewhere are ignored, even NaN.
    With `prox_logp is behavior_logp` every weight is exactly 1: plain GRPO.
    Metrics are detached 0-dim tensors (no GPU sync here); see METRIC_HELP.
    """
    check_loss_inputs(logp, prox_logp, behavior_logp, advantages, mask, cfg, ref_logp, entropy)
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs entropy (with grad)")
    valid = mask != 0
    # Constants of the loss: detached, and zeroed on padding.
    prox_logp, behavior_logp, ref_logp = (_zero_invalid(None if t is None else t.detach(), valid)
                                          for t in (prox_logp, behavior_logp, ref_logp))
    logp = torch.where(valid, logp, prox_logp)  # padding: u = 1, finite, and coef is 0 there anyway
    corr = behavior_correction(prox_logp, behavior_logp, mask, cfg)
    coef = aggregation_weights(mask, cfg, logp.dtype)
    seq = sequence_ratio(logp, prox_logp, mask) if cfg.policy_loss == "gspo" else None
    tok = token_losses(logp, prox_logp, advantages.detach()[:, None].to(logp.dtype), corr.rho.to(logp.dtype), cfg, ref_logp,
                       None if seq is None else seq[:, None].expand_as(logp))
    loss = (coef * tok.total).sum()
    if cfg.entropy_coef > 0:  # the bonus: higher entropy lowers the loss
        loss = loss - cfg.entropy_coef * (coef * torch.where(valid, entropy, 0.0)).sum()
    return loss, loss_metrics(tok, corr, coef, mask, None if entropy is None else entropy.detach(), seq,
                              cfg.entropy_coef)
