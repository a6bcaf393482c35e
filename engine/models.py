"""The models of a PPO run, built once: the policy and the value as one module (one
optimiser, one `accelerator.prepare`, one backward serve both), the reference and the
frozen reward model. Which value layout runs is one lookup in `values.LAYOUTS`;
critic-free estimators run none (`values.NoValue`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.packing import Packed
from engine.policy import AdapterOffReference, FrozenReference, Policy, frozen, no_dropout
from engine.values import LAYOUTS, BuildInputs, NoValue, ValueLayout, head_from
from pipeline.config import ConfigError
from rl.advantages import ESTIMATORS
from rl.tokens import INVALID_LOGPROB, entropy_from_logits, logprobs_from_logits


class PolicyAndValue(nn.Module):
    def __init__(self, policy: Policy, value: ValueLayout):
        super().__init__()
        self.policy = policy
        self.value = value

    def forward(self, packed: Packed, temperature: float, ptx=None):
        """(log-probs of each response token under the policy, values (None without a
        value), entropy), each (batch, response_len) with INVALID_LOGPROB / 0 / 0 off the mask, and the PPO-ptx
        language-modelling loss on `ptx` = (input_ids, attention_mask, labels), or None."""
        if self.value.needs_policy_hidden:
            logits, hidden = self.policy.logits(packed, hidden=True)
        else:
            logits, hidden = self.policy.logits(packed), None
        values = self.value.values(self.policy, packed, hidden)
        logprobs = logprobs_from_logits(logits, packed.tokens, temperature)
        with torch.no_grad():
            entropy = entropy_from_logits(logits, temperature)
        ptx_loss = self.policy.ptx_loss(*ptx) if ptx is not None else None
        values = packed.unpack(values, 0.0) if values is not None else None
        return packed.unpack(logprobs, INVALID_LOGPROB), values, packed.unpack(entropy, 0.0), ptx_loss


@dataclass
class Models:
    trained: PolicyAndValue
    reference: FrozenReference | AdapterOffReference
    reward_model: nn.Module | None
    """The run's first reward-model source (the value layouts start from it), frozen; scores
    with any value adapter on it disabled. None when every reward source is a function."""

    scorers: list[nn.Module] = field(default_factory=list)
    """Every reward-model source's scorer, in the order of the run's sources (the first is
    `reward_model`); set by `engine.rewards.attach_models`."""

    def __post_init__(self):
        if not self.scorers and self.reward_model is not None:
            self.scorers = [self.reward_model]

    def forward_models(self) -> list[nn.Module]:
        """Every model that runs forward passes on packed sequences, for `probes.layout_for`."""
        scorers = [m for m in [self.reward_model, *self.scorers] if m is not None]
        return [self.trained.policy.model, *scorers, *self.trained.value.own_models(), *self.reference.own_models()]


def load_models(cfg, policy_dir: Path, rm_dir: Path | None, reward_std: float = 1.0, note: Callable[[str], None] = print) -> Models:
    """Every model of the run, dropout off everywhere (with it, the update's log-probs
    would differ from the rollout's for no reason). A critic-free estimator builds no
    value; `rm_dir` None (every reward a function) is for critic-free runs only."""
    from transformers import AutoModelForCausalLM

    critic = ESTIMATORS[cfg.advantage].needs_values
    reward_model = load_reward_model(rm_dir) if rm_dir is not None else None
    if reward_model is None and critic:
        raise ConfigError(f"rlhf.advantage: {cfg.advantage} trains a value model, which starts from a reward model; add a reward-model source to rlhf.rewards")
    layout = LAYOUTS[(cfg.value_model, cfg.method)] if critic else NoValue
    model = AutoModelForCausalLM.from_pretrained(policy_dir, **no_dropout(policy_dir))
    head = head_from(reward_model, reward_std) if layout.uses_head else None
    lora = cfg.lora.peft_config("CAUSAL_LM", dropout=0.0, model=model, key="rlhf.lora") if cfg.method == "lora" else None
    policy = Policy.wrap(model, lora)
    reference = AdapterOffReference(policy) if policy.lora else FrozenReference.load(policy_dir)
    value = layout.build(BuildInputs(cfg, policy, reward_model, rm_dir, reward_std, head, lora, note))
    trained = PolicyAndValue(policy, value)
    trained.eval()
    if cfg.activation_checkpointing:
        policy.checkpoint_activations()
    policy.use()
    return Models(trained, reference, value.scorer(reward_model) if reward_model is not None else None)


def load_reward_model(rm_dir: Path) -> nn.Module:
    """A reward-model folder as a frozen one-label sequence classifier, dropout off."""
    from transformers import AutoModelForSequenceClassification

    reward_model = frozen(AutoModelForSequenceClassification.from_pretrained(rm_dir, **no_dropout(rm_dir)))
    if reward_model.config.num_labels != 1 or not hasattr(reward_model, "score"):
        raise ConfigError(f"{rm_dir}: not a one-label reward model (num_labels={reward_model.config.num_labels})")
    return reward_model


def check_same_tokenizer(tokenizer, rm_dir: Path, key: str, policy: str) -> None:
    """The reward model at `rm_dir` (named by `key`) reads the ids of the policy's
    tokenizer (`policy` says where the policy came from)."""
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(rm_dir)
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"{key}: the tokenizer of {rm_dir} differs from the policy's ({policy}); it would score token ids it does not know (train the reward model from the policy's base)")
