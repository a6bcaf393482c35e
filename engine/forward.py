"""The forward passes PPO and the eval stage run on packed sequences: log-probs of
response tokens, values and reward-model scores, read at the right positions.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from engine.packing import Packed, mask_argument


def backbone(model: nn.Module) -> nn.Module:
    """The transformer under a causal-LM or sequence-classification head (with any
    LoRA layers, which live inside it)."""
    if hasattr(model, "get_base_model"):  # a peft model
        model = model.get_base_model()
    return model.base_model


def hidden_states(model: nn.Module, packed: Packed) -> torch.Tensor:
    """The backbone's last hidden states at every packed position: (rows, row_len, hidden)."""
    return backbone(model)(**packed.inputs(model)).last_hidden_state


def response_logits(policy: nn.Module, packed: Packed, output_hidden_states: bool = False):
    """Logits that predict each real response token, (n, vocab), from the model's own
    forward (which applies any logit scaling or soft-capping it has) with the output
    layer run on those positions only. With output_hidden_states, also the last
    hidden states there, (n, hidden)."""
    out = policy(**packed.inputs(policy), logits_to_keep=packed.predicts, output_hidden_states=output_hidden_states)
    if output_hidden_states:
        return out.logits, out.hidden_states[-1][packed.predicts]
    return out.logits


def token_values(model: nn.Module, head: nn.Module, packed: Packed) -> torch.Tensor:
    """The value head on the state each real response token was chosen in: (n,) float32."""
    return head(hidden_states(model, packed)[packed.predicts]).squeeze(-1).float()


def reward_scores(reward_model: nn.Module, packed: Packed, keep_layer: int | None = None):
    """The reward model's score of each whole sequence, read at its last real token (the
    EOS), where the RM stage trained and evaluated it: (batch,) float32. Any adapter on
    it (the value's, in the "reward" layout) is off. With `keep_layer`, also the hidden
    states entering that decoder layer, on the unpacked grid (`Packed.to_grid`)."""
    with adapters_off(reward_model):
        out = backbone(reward_model)(**packed.inputs(reward_model), output_hidden_states=keep_layer is not None)
        scores = reward_model.score(out.last_hidden_state.flatten(0, 1)[packed.last]).squeeze(-1).float()
    if keep_layer is None:
        return scores
    return scores, packed.to_grid(out.hidden_states[keep_layer])


def packed_scores(model: nn.Module, batch: dict) -> torch.Tensor:
    """A sequence-classification model's score of each sequence in a packed batch
    (`input_ids`, `position_ids`, an optional bool `attention_mask`, and `last`: each
    sequence's last token in the flattened rows), with gradients: (batch,). The model's
    own forward runs, so DDP, FSDP and DeepSpeed see every call (the RM stage trains
    this way); as the model returns only each row's last score, the head's output at
    every position is taken on its way out."""
    kept, inner = [], unwrapped(model)
    hook = score_head(inner).register_forward_hook(lambda module, args, output: kept.append(output))
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = mask_argument(inner, batch["attention_mask"])
    try:
        model(**inputs)
    finally:
        hook.remove()
    return kept[-1].flatten(0, 1)[batch["last"]].squeeze(-1)


def unwrapped(model: nn.Module) -> nn.Module:
    """The model under DDP's or DeepSpeed's wrapper (FSDP2 shards in place), and under peft."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def score_head(model: nn.Module) -> nn.Module:
    """The scalar head of a sequence-classification model (under peft, its trainable copy's wrapper)."""
    model = unwrapped(model)
    if not hasattr(model, "score"):
        raise TypeError(f"{type(model).__name__} has no `score` head: a reward model here is a decoder's sequence-classification model")
    return model.score


@contextmanager
def adapters_off(model: nn.Module):
    """A peft model with its adapters disabled (and the trainable ones trainable again
    afterwards); any other model as it is."""
    if not hasattr(model, "disable_adapter"):
        yield
        return
    trainable = [p for p in model.parameters() if p.requires_grad]
    with model.disable_adapter():
        yield
    for p in trainable:
        p.requires_grad_(True)


@contextmanager
def top_layers(model: nn.Module, n: int):
    """The backbone of `model` running only its top `n` decoder layers (and its final
    norm), fed the hidden states entering them as `inputs_embeds`."""
    body = backbone(model)
    layers = body.layers
    body.layers = nn.ModuleList(list(layers)[-n:])
    try:
        yield body
    finally:
        body.layers = layers
