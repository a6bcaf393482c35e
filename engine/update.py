"""Step 4 of PPO: epochs over shuffled minibatches of the rollout, one optimiser step
per minibatch, gradients accumulated over its microbatches (CleanRL's loop)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from engine.packing import Layout, pack_rollout
from pipeline.errors import TrainingDiverged
from rl.losses import policy_loss, value_loss
from rl.masked import masked_mean
from rl.trajectory import Rollout


@dataclass
class Learner:
    """What the update needs besides the batch: the prepared model and its optimiser."""

    accelerator: object
    model: torch.nn.Module  # the PolicyAndValue as accelerate prepared it (DDP-wrapped on several processes)
    optimizer: torch.optim.Optimizer
    settings: object  # the rlhf config: batch sizes, epochs, clip ranges, coefficients
    layout: Layout
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


def ppo_update(learner: Learner, batch: Rollout, advantages, returns, first_forward=None) -> dict[str, float]:
    """`ppo_epochs` passes over the batch in shuffled minibatches. `first_forward`, in
    one-pass mode, is the forward already run on the whole batch. Returns mean stats."""
    cfg, accelerator = learner.settings, learner.accelerator
    n_micro = cfg.minibatch_size // cfg.microbatch_size
    totals: dict[str, float] = {}
    count = 0
    device = batch.responses.device
    for _ in range(cfg.ppo_epochs):
        order = torch.arange(cfg.batch_size, device=device) if first_forward is not None else torch.randperm(cfg.batch_size, device=device)
        for start in range(0, cfg.batch_size, cfg.minibatch_size):
            minibatch = order[start : start + cfg.minibatch_size]
            for micro in range(n_micro):
                index = minibatch[micro * cfg.microbatch_size : (micro + 1) * cfg.microbatch_size]
                sync = micro == n_micro - 1
                with torch.enable_grad(), accelerator.no_sync(learner.model) if not sync else nullcontext():
                    if first_forward is not None:
                        outputs, first_forward = first_forward, None
                    else:
                        outputs = policy_forward(learner, batch.select(index))
                    loss, stats = microbatch_loss(cfg, batch.select(index), outputs, advantages[index], returns[index])
                    accelerator.backward(loss / n_micro)
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + float(value.detach() if torch.is_tensor(value) else value)
                count += 1
            accelerator.clip_grad_norm_(learner.model.parameters(), cfg.max_grad_norm)
            learner.optimizer.step()
            learner.optimizer.zero_grad(set_to_none=True)
    return {key: value / count for key, value in totals.items()}


def microbatch_loss(cfg, mb: Rollout, outputs, advantages, returns):
    """PPO's loss on one microbatch, `policy + vf_coef * value (+ ptx_coef * ptx)`, and its stats."""
    logprobs, values, entropy, ptx_loss = outputs
    pg_loss, pg_stats = policy_loss(logprobs, mb.logprobs, advantages, mb.response_mask, cfg.clip_range)
    vf_loss, vf_stats = value_loss(values, mb.values, returns, mb.response_mask, cfg.clip_range_value)
    loss = pg_loss + cfg.vf_coef * vf_loss
    stats = {
        "loss/policy": pg_loss,
        "loss/value": vf_loss,
        "policy/entropy": masked_mean(entropy, mb.response_mask),
        **{f"policy/{k}": v for k, v in pg_stats.items()},
        "value/clipfrac": vf_stats["vf_clipfrac"],
        "value/explained_variance": vf_stats["explained_variance"],
    }
    if ptx_loss is not None:
        loss = loss + cfg.ptx_coef * ptx_loss
        stats["loss/ptx"] = ptx_loss
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"rlhf: the loss became {loss.item()} (policy {pg_loss.item():.4g}, value {vf_loss.item():.4g}); lower rlhf.learning_rate or check the reward model")
    return loss, stats
