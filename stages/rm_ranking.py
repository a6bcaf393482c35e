"""The reward model's loss and metrics as pure functions of rewards (torch only).

A batch holds several prompts' rankings flattened into one list of completions, so
one forward pass scores all of them. Pairs are index pairs into that list:
`better[p]` should out-score `worse[p]`, and `group[p]` says which prompt the pair
belongs to. InstructGPT's loss averages a prompt's K(K-1)/2 pairs, then the prompts:

    loss = mean over prompts g of  mean over pairs (i, j) of g of  -log sigmoid(r_i - r_j - m_ij)

so a K=9 ranking weighs as much as a K=2 pair instead of 36 times more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ranking_loss(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    group: torch.Tensor,
    margins: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Bradley-Terry loss averaged per prompt, then over prompts.

    rewards (completions,); better, worse, group (pairs,) long; margins (pairs,) or None.
    `center_coef` adds coef * mean(r^2), which keeps rewards near 0 (Eisenstein et al. 2023).
    The loss is computed in fp32 whatever the rewards' dtype: under bf16 autocast the score
    head gives bf16 rewards while logsigmoid runs in fp32, and the per-prompt sums must not
    mix the two (nor round a K=9 ranking's 36 pair losses to 8 bits).
    """
    rewards = rewards.float()
    diff = rewards[better] - rewards[worse]
    if margins is not None:
        diff = diff - margins
    per_pair = -F.logsigmoid(diff)
    n_groups = int(group.max()) + 1
    pairs_per_group = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, group, torch.ones_like(per_pair))
    loss_per_group = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, group, per_pair) / pairs_per_group
    loss = loss_per_group.mean()
    if center_coef:
        loss = loss + center_coef * rewards.pow(2).mean()
    return loss


def pairwise_stats(rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor) -> dict[str, float]:
    """Accuracy (ties count as wrong: an untrained head must not look right) and the
    mean reward margin over pairs."""
    diff = (rewards[better] - rewards[worse]).detach().float()
    return {"accuracy": (diff > 0).float().mean().item(), "margin": diff.mean().item()}


def ranking_metrics(rewards: list[list[float]], pairs: list[list[tuple[int, int]]], kinds: list[list[str]] | None = None) -> dict:
    """Held-out metrics over whole rankings: pairwise accuracy and margin over all
    pairs, the reward distribution over all completions, accuracy by K, and with
    `kinds` (a label per pair, e.g. the one criterion its completions differ in)
    accuracy and pair count by label."""
    flat = torch.tensor([r for group in rewards for r in group], dtype=torch.float64)
    correct, margins, by_k, by_kind = [], [], {}, {}
    for g, (group_rewards, group_pairs) in enumerate(zip(rewards, pairs, strict=True)):
        k = len(group_rewards)
        for p, (i, j) in enumerate(group_pairs):
            diff = group_rewards[i] - group_rewards[j]
            correct.append(diff > 0)
            margins.append(diff)
            by_k.setdefault(k, []).append(diff > 0)
            if kinds is not None:
                by_kind.setdefault(kinds[g][p], []).append(diff > 0)
    metrics = {
        "accuracy": sum(correct) / len(correct),
        "margin": sum(margins) / len(margins),
        "reward_mean": flat.mean().item(),
        "reward_std": flat.std(unbiased=False).item() if len(flat) > 1 else 0.0,
        "pairs": len(correct),
        "prompts": len(rewards),
        "accuracy_by_k": {str(k): sum(v) / len(v) for k, v in sorted(by_k.items())},
    }
    if kinds is not None:
        metrics["accuracy_by_criterion"] = {kind: {"accuracy": sum(v) / len(v), "pairs": len(v)} for kind, v in sorted(by_kind.items())}
    return metrics

