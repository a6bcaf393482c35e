"""Per-step PPO metrics, named as TRL and OpenRLHF users expect (objective/, policy/,
value/, loss/, response/, time/), and the phase timer behind the time/ ones."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rl.tokens import sequence_lengths
from rl.trajectory import Rollout


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


@dataclass
class StepRecord:
    """One PPO step's numbers, as the driver has them, before averaging over processes."""

    step: int
    episodes: int
    batch: Rollout
    scores: torch.Tensor  # (batch,) normalised and penalised scores
    non_score: torch.Tensor  # (batch, response_len) the KL penalty per token
    kl: float  # KL per episode, averaged over processes
    kl_coef: float  # the coefficient this step's rewards used
    update: dict[str, float]  # ppo_update's mean stats
    lr: float
    timer: Timer


def step_metrics(accelerator, record: StepRecord, sources=None) -> dict:
    """One metrics.jsonl row, averaged over processes; with the run's reward `sources`
    (engine.rewards.Sources), also each source's mean rating, `reward/<name>`."""
    batch, scores, non_score = record.batch, record.scores, record.non_score
    mask = batch.response_mask
    local = {
        "objective/scores": scores.mean(),
        "objective/non_score_reward": non_score.sum(1).mean(),
        "objective/rlhf_reward": (scores + non_score.sum(1)).mean(),
        "response/length": sequence_lengths(mask).float().mean(),
        "response/eos_fraction": batch.ended.float().mean(),
    }
    row = {"step": record.step, "episode": record.episodes}
    for key, value in local.items():
        row[key] = accelerator.reduce(value.detach().float(), "mean").item()
    if sources is not None:
        pairs = sources.metrics(batch.ratings, batch.rated)
        # One all-reduce for every source's (sum, count), not one per metric.
        for key, (total, count) in zip(pairs, accelerator.reduce(torch.stack(list(pairs.values())).float(), "sum").tolist(), strict=True):
            row[key] = total / count if count else None
    row["objective/kl"] = record.kl
    row["objective/kl_coef"] = record.kl_coef
    for key, value in record.update.items():
        row[key] = accelerator.reduce(torch.tensor(value, device=accelerator.device), "mean").item()
    row["objective/entropy"] = row.pop("policy/entropy") * row["response/length"]
    row["lr"] = record.lr
    total = sum(record.timer.seconds.values())
    row.update({f"time/{k}": round(v, 3) for k, v in record.timer.seconds.items()})
    row["time/step"] = round(total, 3)
    tokens = accelerator.reduce(mask.sum().float() + batch.query_mask.sum().float(), "sum").item()
    row["tokens_per_second"] = round(tokens / total, 1) if total else None
    return row
