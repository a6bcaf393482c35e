"""Step 4: epochs over shuffled minibatches of the rollout, one optimiser step per
minibatch, gradients accumulated over its microbatches (CleanRL's loop). The loss is
PPO's clipped surrogate, plus the value loss when the run has a value, plus the KL
as a loss term when the run puts it there (GRPO's k3), aggregated over tokens the
way the estimator's paper does (`Objective`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.packing import Layout, pack_rollout
from pipeline.errors import TrainingDiverged
from rl.losses import aggregator, kl_loss, policy_loss, value_loss
from rl.masked import masked_mean
from rl.trajectory import Rollout


@dataclass(frozen=True)
class Objective:
    """The loss's choices, resolved once from the estimator's defaults and the settings."""

    kl_in_loss: bool  # the KL is a loss term (else it is shaped into the rewards)
    kl_estimator: str  # k1, k2 or k3 (rl/kl.py), for the loss term
    aggregation: str  # token_mean, sequence_mean or constant (rl/losses.py)
    kl_bias_correction: bool = False  # the KL loss term weighted by pi / pi_old (rl/losses.py's kl_loss)
    group_size: int = 1  # K answers per prompt; minibatches shuffle whole groups


@dataclass
class Learner:
    """What the update needs besides the batch: the prepared model and its optimiser."""

    accelerator: object
    model: torch.nn.Module  # the PolicyAndValue as accelerate prepared it (DDP-wrapped on several processes)
    optimizer: torch.optim.Optimizer
    settings: object  # the rlhf config: batch sizes, epochs, clip ranges, coefficients
    layout: Layout
    objective: Objective = Objective(kl_in_loss=False, kl_estimator="k1", aggregation="token_mean")  # PPO's
    ptx: object | None = None  # PPO-ptx microbatches (engine.ptx.PtxStream), or None


def one_pass(cfg) -> bool:
    """One PPO epoch over one microbatch: the update's only forward runs on the very
    weights that produced the rollout, so its log-probs and values *are* the old ones.
    Taking them from it, rather than from a separate no-grad pass, saves a forward of
    the policy (and of the value model) per step and changes no number."""
    return cfg.ppo_epochs == 1 and cfg.microbatch_size == cfg.batch_size


def policy_forward(learner: Learner, batch: Rollout):
    """The update's forward on `batch`: (logprobs, values, entropy, ptx loss), with grad."""
    ptx_batch = next(learner.ptx) if learner.ptx is not None else None
    with torch.enable_grad():
        return learner.model(pack_rollout(batch, learner.layout), learner.settings.temperature, ptx_batch)


def ppo_update(learner: Learner, batch: Rollout, advantages, returns, first_forward=None, kl_coef: float = 0.0) -> dict[str, float]:
    """`ppo_epochs` passes over the batch in shuffled minibatches. `first_forward`, in
    one-pass mode, is the forward already run on the whole batch. `kl_coef` weighs the
    KL loss term, when the objective has one. Returns mean stats."""
    cfg, accelerator = learner.settings, learner.accelerator
    n_micro = cfg.minibatch_size // cfg.microbatch_size
    totals: dict[str, float] = {}
    count, norms = 0, []
    for _ in range(cfg.ppo_epochs):
        order = episode_order(cfg.batch_size, learner.objective.group_size, first_forward is None, batch.responses.device)
        for start in range(0, cfg.batch_size, cfg.minibatch_size):
            minibatch = order[start : start + cfg.minibatch_size]
            for micro in range(n_micro):
                index = minibatch[micro * cfg.microbatch_size : (micro + 1) * cfg.microbatch_size]
                # accumulate() syncs gradients on the minibatch's last microbatch only (the
                # accelerator counts n_micro per optimiser step), and backward() divides the
                # loss by n_micro; under DeepSpeed its engine does both, and steps there.
                with torch.enable_grad(), accelerator.accumulate(learner.model):
                    if first_forward is not None:
                        outputs, first_forward = first_forward, None
                    else:
                        outputs = policy_forward(learner, batch.select(index))
                    loss, stats = microbatch_loss(learner, batch.select(index), outputs, (advantages[index], returns[index]), kl_coef)
                    accelerator.backward(loss)
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + float(value.detach() if torch.is_tensor(value) else value)
                count += 1
            norm = accelerator.clip_grad_norm_(learner.model.parameters(), cfg.max_grad_norm)
            if norm is not None:  # DeepSpeed clips inside its engine and returns none here
                norms.append(float(norm))
            learner.optimizer.step()
            learner.optimizer.zero_grad(set_to_none=True)
    stats = {key: value / count for key, value in totals.items()}
    if norms:  # before clipping, as TRL and OpenRLHF log it: how often max_grad_norm bites
        stats["policy/grad_norm"] = sum(norms) / len(norms)
    return stats


def episode_order(batch_size: int, group_size: int, shuffle: bool, device) -> torch.Tensor:
    """The order minibatches take episodes in: shuffled by whole groups, so the K answers
    to a prompt stay together and share their prompt in the packed forward (with K=1,
    the very permutation an episode-wise shuffle draws)."""
    if not shuffle:
        return torch.arange(batch_size, device=device)
    groups = torch.randperm(batch_size // group_size, device=device)
    return (groups[:, None] * group_size + torch.arange(group_size, device=device)).flatten()


def microbatch_loss(learner: Learner, mb: Rollout, outputs, targets, kl_coef: float):
    """The loss on one microbatch, `policy (+ vf_coef * value) (+ kl_coef * KL) (+
    ptx_coef * ptx)`, and its stats. targets = (advantages, returns)."""
    cfg, objective = learner.settings, learner.objective
    (logprobs, values, entropy, ptx_loss), (advantages, returns) = outputs, targets
    aggregate = aggregator(objective.aggregation, cfg.max_new_tokens)
    pg_loss, pg_stats = policy_loss(logprobs, mb.logprobs, advantages, mb.response_mask, cfg.clip_range, aggregate=aggregate)
    loss = pg_loss
    stats = {
        "loss/policy": pg_loss,
        "policy/entropy": masked_mean(entropy, mb.response_mask),
        **{f"policy/{k}": v for k, v in pg_stats.items()},
    }
    if values is not None:
        vf_loss, vf_stats = value_loss(values, mb.values, returns, mb.response_mask, cfg.clip_range_value)
        loss = loss + cfg.vf_coef * vf_loss
        stats.update({"loss/value": vf_loss, "value/clipfrac": vf_stats["vf_clipfrac"], "value/explained_variance": vf_stats["explained_variance"]})
    if objective.kl_in_loss:
        old = mb.logprobs if objective.kl_bias_correction else None
        kl_term, _ = kl_loss(logprobs, mb.ref_logprobs, mb.response_mask, objective.kl_estimator, aggregate, old_logprobs=old)
        loss = loss + kl_coef * kl_term
        stats["loss/kl"] = kl_term
    if ptx_loss is not None:
        loss = loss + cfg.ptx_coef * ptx_loss
        stats["loss/ptx"] = ptx_loss
    if not torch.isfinite(loss):
        parts = ", ".join(f"{k.split('/')[1]} {v.item():.4g}" for k, v in stats.items() if k.startswith("loss/"))
        raise TrainingDiverged(f"rlhf: the loss became {loss.item()} ({parts}); lower rlhf.learning_rate or check the reward")
    return loss, stats
