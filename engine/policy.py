"""The trained policy (full weights, or a LoRA adapter named "policy" on one frozen
copy of the SFT weights) and its reference, the SFT model the KL penalty measures
against.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from engine.forward import response_logits
from engine.packing import Packed
from pipeline.config import ConfigError
from rl.tokens import logprobs_from_logits

POLICY = "policy"
"""The policy's adapter name in LoRA mode."""


def no_dropout(folder: Path) -> dict:
    """Config overrides that zero every dropout probability the config names: with
    dropout, the update's log-probs would differ from the rollout's for no reason."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    return {k: 0.0 for k, v in config.to_dict().items() if "dropout" in k and isinstance(v, float)}


def frozen(model: nn.Module) -> nn.Module:
    model.eval().requires_grad_(False)
    return model


class Policy(nn.Module):
    """The causal LM being trained. `lora`: `model` is a peft model whose "policy"
    adapter is trained, and whose weights with every adapter off are the reference."""

    def __init__(self, model: nn.Module, lora: bool):
        super().__init__()
        self.model = model
        self.lora = lora

    @classmethod
    def wrap(cls, model: nn.Module, lora_config=None) -> Policy:
        """`model` trained in full, or (with a peft LoraConfig) through a "policy" adapter."""
        if lora_config is None:
            return cls(model, lora=False)
        from peft import get_peft_model

        return cls(get_peft_model(model, lora_config, adapter_name=POLICY), lora=True)

    def use(self, adapter: str = POLICY) -> None:
        """Make `adapter` the active one (LoRA). peft's set_adapter and disable_adapter
        freeze the inactive adapters, so every LoRA weight is made trainable again."""
        if not self.lora:
            return
        self.model.base_model.set_adapter(adapter)
        for name, p in self.model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)

    def checkpoint_activations(self) -> None:
        """Keep only each decoder layer's input in the forward pass and recompute the rest
        in the backward (rlhf.activation_checkpointing): less memory, one more forward.
        Transformers checkpoints a layer only in training mode; every model of the run has
        dropout off (`no_dropout`), so the layers go into training mode computing exactly
        what they did, and outside them the model stays in eval mode."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        base = self.model.get_base_model() if self.lora else self.model
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise ConfigError(f"rlhf.activation_checkpointing: {type(base).__name__} does not support activation checkpointing")
        base.activation_checkpointing_enable({"use_reentrant": False})
        for module in base.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.train()

    def adapted_modules(self) -> list[str]:
        """Module-name suffixes the policy adapter covers, for a second adapter to cover alike."""
        return sorted({name.rsplit(".", 1)[-1] for name, m in self.model.named_modules() if hasattr(m, "lora_A") and POLICY in m.lora_A})

    def logits(self, packed: Packed, hidden: bool = False):
        """Logits predicting each real response token (n, vocab); with `hidden`, also the
        last hidden states there (n, hidden)."""
        self.use(POLICY)
        return response_logits(self.model, packed, output_hidden_states=hidden)

    def ptx_loss(self, ids, mask, labels) -> torch.Tensor:
        """The language-modelling loss of PPO-ptx on one microbatch of SFT rows."""
        return self.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss

    @contextmanager
    def sampling_weights(self, merge: bool, note: Callable[[str], None]):
        """The module to sample with. With `merge` (LoRA), the policy adapter is folded
        into a temporary copy of each weight it adapts: one matmul per linear layer per
        token instead of three (about a fifth of the generation time on a CPU), at the
        cost of that copy while sampling. Afterwards the frozen weights are the very
        tensors they were: unmerging by subtraction would round them away from the SFT
        model, which they must stay as the reference. Layers this cannot fold safely
        (quantised weights, DoRA) sample unmerged, said through `note`."""
        self.use(POLICY)
        folded = _foldable_lora_layers(self.model) if merge and self.lora else None
        if merge and self.lora and not folded:
            note("sampling with the LoRA policy unmerged: its layers cannot be folded safely (same distribution, slower)")
        if not folded:
            yield self.model
            return
        originals = []
        try:
            for layer in folded:
                base = layer.get_base_layer()
                originals.append((base, base.weight))
                base.weight = nn.Parameter(base.weight + layer.get_delta_weight(POLICY).to(base.weight.dtype), requires_grad=False)
            with self.model.disable_adapter():
                yield self.model
        finally:
            for base, weight in originals:
                base.weight = weight
            self.use(POLICY)

    def merged_copy(self) -> nn.Module:
        """A plain causal LM with the policy's weights, for the final folder."""
        if not self.lora:
            return self.model
        model = copy.deepcopy(self.model)
        for name in list(model.peft_config):
            if name != POLICY:
                model.delete_adapter(name)
        return model.merge_and_unload()


class FrozenReference:
    """Full fine-tuning: the reference is a frozen copy of the SFT model."""

    def __init__(self, model: nn.Module):
        self.model = frozen(model)

    @classmethod
    def load(cls, policy_dir: Path) -> FrozenReference:
        from transformers import AutoModelForCausalLM

        return cls(AutoModelForCausalLM.from_pretrained(policy_dir, **no_dropout(policy_dir)))

    def to(self, device) -> FrozenReference:
        self.model.to(device)
        return self

    def own_models(self) -> list[nn.Module]:
        return [self.model]

    def logprobs(self, packed: Packed, temperature: float) -> torch.Tensor:
        """(n,) log-probs of the real response tokens under the SFT model."""
        return logprobs_from_logits(response_logits(self.model, packed), packed.tokens, temperature)


class AdapterOffReference:
    """LoRA: the reference is the policy's own weights with every adapter off, which is
    the SFT model because the SFT stage hands over a merged folder. No second copy."""

    def __init__(self, policy: Policy):
        self.policy = policy

    def to(self, device) -> AdapterOffReference:
        return self

    def own_models(self) -> list[nn.Module]:
        return []  # the policy's own

    def logprobs(self, packed: Packed, temperature: float) -> torch.Tensor:
        with self.policy.model.disable_adapter():
            logits = response_logits(self.policy.model, packed)
        self.policy.use(POLICY)
        return logprobs_from_logits(logits, packed.tokens, temperature)


def _foldable_lora_layers(peft_model: nn.Module) -> list | None:
    """The LoRA linear layers holding a "policy" adapter, or None if any of them is
    something `merged_policy` should not touch."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and "policy" in m.lora_A]
    for layer in layers:
        base = layer.get_base_layer()
        plain = type(layer) is LoraLinear and type(base) is nn.Linear and type(base.weight) is nn.Parameter and type(base.weight.data) is torch.Tensor
        if not plain or layer.use_dora.get("policy") or layer.merged or base.weight.shape != (base.out_features, base.in_features):
            return None
    return layers or None
