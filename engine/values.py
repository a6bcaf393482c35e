"""Where the value function lives: one class per layout, each with the same three
parts, `build` (from the run's models), `values` (per response token) and
`save_model` (a plain sequence-classification model for value/). A new layout is a
new class here and a line in `LAYOUTS`; nothing else changes.

Every layout's head starts as the reward model's head over the RM's std, so the first
values are on the scale of the standardised scores they must learn.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.forward import backbone, hidden_states, token_values, top_layers
from engine.packing import Packed
from engine.policy import Policy, no_dropout
from engine.probes import runs_top_layers
from pipeline.config import ConfigError

VALUE = "value"
"""The value's adapter name in the LoRA layouts."""


@dataclass
class BuildInputs:
    """What a layout is built from."""

    settings: object  # the rlhf config: method, value_layers, ...
    policy: Policy
    reward_model: nn.Module  # frozen, dropout off
    rm_dir: Path
    reward_std: float
    head: nn.Linear | None  # made before any adapter (see `head_from`); None when the layout has no head of its own
    lora: object | None  # the policy's peft LoraConfig (LoRA runs)
    note: Callable[[str], None]  # hears about fallbacks


class ValueLayout(nn.Module):
    uses_head = True
    """Whether `build` takes a fresh head (`BuildInputs.head`)."""
    needs_policy_hidden = False
    switches_adapters = False
    """Runs the policy's own layers with another adapter active: a backward that recomputes
    them (activation checkpointing) would run whichever adapter is active by then."""
    """True when `values` reads the policy's last hidden states (one forward for both)."""
    keep_layer: int | None = None
    """The reward model's decoder layer whose input states scoring should record for `values`."""

    def values(self, policy: Policy, packed: Packed, policy_hidden: torch.Tensor | None) -> torch.Tensor | None:
        """V of the state each real response token was chosen in: (n,) float32 (None: no value)."""
        raise NotImplementedError

    def save_model(self, policy: Policy) -> nn.Module | None:
        """The value as a plain sequence-classification model, for value/ (None: no value)."""
        raise NotImplementedError

    def scorer(self, reward_model: nn.Module) -> nn.Module:
        """The module to score with: the reward model, unless the layout wrapped it."""
        return reward_model

    def own_models(self) -> list[nn.Module]:
        """Models of its own that run forward passes (not the policy's or the reward model's)."""
        return []


class ValueModelCopy(ValueLayout):
    """separate, full: the value is a trainable copy of the reward model (InstructGPT)."""

    uses_head = False

    def __init__(self, value_model: nn.Module):
        super().__init__()
        self.value_model = value_model

    @classmethod
    def build(cls, given: BuildInputs) -> ValueModelCopy:
        from transformers import AutoModelForSequenceClassification

        value = AutoModelForSequenceClassification.from_pretrained(given.rm_dir, **no_dropout(given.rm_dir))
        with torch.no_grad():
            value.score.weight.div_(given.reward_std)
        return cls(value)

    def values(self, policy, packed, policy_hidden):
        return token_values(self.value_model, self.value_model.score, packed)

    def own_models(self):
        return [self.value_model]

    def save_model(self, policy):
        return self.value_model


class ValueAdapter(ValueLayout):
    """separate, LoRA: a second adapter, "value", on the policy's frozen SFT weights
    (on the top `value_layers` only, if set, so its backward stops there), under a
    head that starts as the reward model's."""

    switches_adapters = True

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    @classmethod
    def build(cls, given: BuildInputs) -> ValueAdapter:
        given.policy.model.add_adapter(VALUE, _value_lora(given, given.policy.model.config.num_hidden_layers))
        return cls(given.head)

    def values(self, policy, packed, policy_hidden):
        policy.use(VALUE)
        try:
            return token_values(policy.model, self.head, packed)
        finally:
            policy.use()

    def save_model(self, policy):
        model = copy.deepcopy(policy.model)
        model.set_adapter(VALUE)
        for name in list(model.peft_config):
            if name != VALUE:
                model.delete_adapter(name)
        return value_model_from(model.merge_and_unload(), self.head)


class ValueOnReward(ValueLayout):
    """reward, LoRA: the value adapter and head sit on the frozen reward model, which
    scores with the adapter disabled, so the value starts as exactly the reward model.
    With `value_layers`, its forward runs only the top layers, fed the reward model's
    own hidden states below them, recorded while it scored the batch."""

    def __init__(self, reward_model: nn.Module, head: nn.Module, top: int | None):
        super().__init__()
        self.reward_model = reward_model
        self.head = head
        self.top = top
        self.keep_layer = len(backbone(reward_model).layers) - top if top else None

    @classmethod
    def build(cls, given: BuildInputs) -> ValueOnReward:
        from peft import get_peft_model

        n = given.reward_model.config.num_hidden_layers
        lora = _value_lora(given, n)
        lora.task_type = None  # a plain peft wrapper: the RM is called through its backbone and head
        lora.base_model_name_or_path = str(given.rm_dir)
        wrapped = get_peft_model(given.reward_model, lora, adapter_name=VALUE)
        layers = given.settings.value_layers
        top = layers if layers is not None and runs_top_layers(wrapped, layers) else None
        if layers is not None and layers < n and top is None:
            given.note(f"the value runs every layer: {given.rm_dir} cannot run its top {layers} layers alone (same numbers, slower)")
        return cls(wrapped, given.head, top)

    def scorer(self, reward_model):
        return self.reward_model

    def values(self, policy, packed, policy_hidden):
        if self.top and packed.value_inputs is not None:
            inputs = packed.inputs(self.reward_model)
            del inputs["input_ids"]
            with top_layers(self.reward_model, self.top) as top:
                hidden = top(inputs_embeds=packed.value_inputs, **inputs).last_hidden_state
        else:
            hidden = hidden_states(self.reward_model, packed)
        return self.head(hidden[packed.predicts]).squeeze(-1).float()

    def save_model(self, policy):
        return value_model_from(copy.deepcopy(self.reward_model).merge_and_unload(), self.head)


class SharedHead(ValueLayout):
    """shared: a value head on the policy's own last hidden states. One forward gives
    log-probs and values, so each step runs one forward and one backward fewer, at the
    cost of policy and value sharing features."""

    needs_policy_hidden = True

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    @classmethod
    def build(cls, given: BuildInputs) -> SharedHead:
        return cls(given.head)

    def values(self, policy, packed, policy_hidden):
        return self.head(policy_hidden).squeeze(-1).float()

    def save_model(self, policy):
        return value_model_from(policy.merged_copy(), self.head)


class NoValue(ValueLayout):
    """Critic-free estimators (GRPO, RLOO, ...): the group of answers to a prompt is the
    baseline, so no value model is built, trained or saved."""

    uses_head = False

    @classmethod
    def build(cls, given: BuildInputs) -> NoValue:
        return cls()

    def values(self, policy, packed, policy_hidden):
        return None

    def save_model(self, policy):
        return None


LAYOUTS: dict[tuple[str, str], type[ValueLayout]] = {
    # (rlhf.value_model, rlhf.method) -> layout
    ("separate", "full"): ValueModelCopy,
    ("separate", "lora"): ValueAdapter,
    ("reward", "lora"): ValueOnReward,
    ("shared", "full"): SharedHead,
    ("shared", "lora"): SharedHead,
}


def head_from(reward_model: nn.Module, reward_std: float) -> nn.Linear:
    """A copy of the reward model's head over its std. Made before any LoRA adapter, as
    every run so far made it, so that adapters start from the same random draws."""
    head = nn.Linear(reward_model.score.in_features, 1, bias=reward_model.score.bias is not None)
    head.load_state_dict(reward_model.score.state_dict())
    with torch.no_grad():
        head.weight.div_(reward_std)
    return head


def _value_lora(given: BuildInputs, n_layers: int):
    """The value adapter's config: the policy adapter's settings, on the same module
    suffixes (peft honours layers_to_transform only with suffixes, and may have
    expanded "all-linear" into full paths), on the top `value_layers` if set."""
    layers = given.settings.value_layers
    if layers is not None and layers > n_layers:
        raise ConfigError(f"rlhf.value_layers: {layers} is more than the model's {n_layers} layers")
    lora = copy.deepcopy(given.lora)
    lora.target_modules = given.policy.adapted_modules()
    if layers is not None:
        lora.layers_to_transform = list(range(n_layers - layers, n_layers))
    return lora


def value_model_from(backbone_model: nn.Module, head: nn.Module) -> nn.Module:
    """A sequence-classification model with this backbone and head, so value/ loads
    with AutoModelForSequenceClassification like the reward model."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(backbone_model.config)
    config.num_labels = 1
    config.architectures = None
    value = AutoModelForSequenceClassification.from_config(config)
    value.base_model.load_state_dict(backbone_model.base_model.state_dict())
    value.score.load_state_dict(head.state_dict())
    return value
