"""The run's reward sources, rated on every rollout: what step 2 turns into scores.

A source is a reward-model folder or a function written as code,
`fn(prompts: list[str], completions: list[str]) -> list[float | None]`, with a weight
and a role: `train` sources make the reward, `audit` sources are logged every step and
never reach the gradient (the demo's gold judge is one). Each train source is
standardised on its own before weighting, so a weight means what it says whatever the
source's scale: a reward model with the held-out mean and std the RM stage stored, a
function with the running mean and std of every rating it has given in this run
(checkpointed, the same on every process).

None from a function means it cannot rate that completion: the source is left out of
that episode's sum. An episode no train source rated has `rated` false; critic-free
estimators leave it out of its group's baseline and give it no gradient, and GAE reads
its score as 0 (the sources' mean). Both are counted in the step's metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.reward_functions import prompt_text, rate
from rl.rewards import RunningMoments, combine_ratings
from rl.tokens import sequence_lengths


@dataclass
class Source:
    name: str
    role: str  # "train" or "audit"
    weight: float
    normalize: bool
    model_dir: Path | None = None  # a reward-model folder, or None for a function
    function: Callable | None = None  # fn(prompts, completions) -> list[float | None]
    spec: str = ""  # module:function as configured, for messages
    stats: tuple[float, float] | None = None  # a reward model's held-out mean and std
    model: nn.Module | None = field(default=None, repr=False)  # the loaded reward model (its scorer)

    @property
    def trains(self) -> bool:
        return self.role == "train"


class Sources:
    """The run's sources in config order, and the running moments of the function
    sources it standardises (registered for checkpointing when there are any)."""

    def __init__(self, sources: list[Source]):
        self.sources = sources
        self.moments = {s.name: RunningMoments() for s in sources if s.function is not None and s.normalize and s.trains}

    @property
    def models(self) -> list[Source]:
        return [s for s in self.sources if s.model_dir is not None]

    @property
    def needs_text(self) -> bool:
        return any(s.function is not None for s in self.sources)

    def rate(self, model_scores: torch.Tensor, texts: tuple[list[str], list[str]] | None) -> torch.Tensor:
        """Every source's raw rating of each episode, (batch, sources): the reward models'
        scores (`model_scores`, (batch, models) in the order of `models`) and each
        function called on `texts` = (prompts, completions)."""
        columns, next_model = [], 0
        for source in self.sources:
            if source.function is None:
                columns.append(model_scores[:, next_model].float())
                next_model += 1
            else:
                ratings = rate(source.spec or source.name, source.function, *texts)
                columns.append(ratings.to(model_scores.device))
        return torch.stack(columns, 1)

    def train_reward(self, ratings: torch.Tensor, everyone: torch.Tensor | None = None, running: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, rated), both (batch,): the train sources standardised, weighted and
        summed. `everyone` holds every process's ratings; the running moments learn
        from them first, so all processes standardise alike. running=False uses no
        running moments (functions count raw): the held-out check, whose before and
        after must be comparable."""
        if running and self.moments:
            seen = everyone if everyone is not None else ratings
            for i, source in enumerate(self.sources):
                if source.name in self.moments:
                    self.moments[source.name].update(seen[:, i])
        means, stds, weights = [], [], []
        for source in self.sources:
            mean, std = 0.0, 1.0
            if source.stats is not None and source.normalize:
                mean, std = source.stats
            elif running and source.name in self.moments:
                mean, std = self.moments[source.name].mean_std()
            means.append(mean)
            stds.append(std)
            weights.append(source.weight if source.trains else 0.0)
        columns = torch.tensor([means, stds, weights], dtype=torch.float32, device=ratings.device)
        return combine_ratings(ratings, *columns)

    def metrics(self, ratings: torch.Tensor, rated: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per source: mean raw rating over the episodes it rated, and for functions the
        share it could not rate; the share no train source rated. Each as (sum, count)
        pairs for averaging over processes."""
        out = {}
        for i, source in enumerate(self.sources):
            column = ratings[:, i]
            known = ~torch.isnan(column)
            out[f"reward/{source.name}"] = torch.stack([torch.where(known, column, 0.0).sum(), known.sum().float()])
            if source.function is not None:
                out[f"reward/{source.name}/unrated"] = torch.stack([(~known).sum().float(), torch.tensor(float(len(column)), device=column.device)])
        out["objective/unrated"] = torch.stack([(~rated).sum().float(), torch.tensor(float(len(rated)), device=rated.device)])
        return out

    def state_dict(self) -> dict:
        return {name: m.state_dict() for name, m in self.moments.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, m in self.moments.items():
            m.load_state_dict(state[name])


def attach_models(sources: Sources, primary: nn.Module | None, load: Callable[[Path], nn.Module]) -> list[nn.Module]:
    """Each reward-model source's scorer, in order: the run's primary reward model (the
    first model source, loaded with the value layouts) for the first, `load(folder)`
    for any other."""
    scorers = []
    for i, source in enumerate(sources.models):
        source.model = primary if i == 0 else load(source.model_dir)
        scorers.append(source.model)
    return scorers


def episode_texts(tokenizer, chat_prompts: list[list[dict]], responses: torch.Tensor, response_mask: torch.Tensor) -> tuple[list[str], list[str]]:
    """What reward functions read: the last user message of each episode's prompt, and
    its response decoded without special tokens."""
    lengths = sequence_lengths(response_mask)
    completions = [tokenizer.decode(responses[r, : lengths[r]], skip_special_tokens=True).strip() for r in range(len(lengths))]
    return [prompt_text(p) for p in chat_prompts], completions
