"""What a model supports, asked by trying it on two toy sequences rather than assumed
from its class: packed sequences kept apart, a shared prompt prefix, running only
its top layers. Each answer is computed when asked; callers ask once per run and
keep the result (there is no cache here to go stale).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.forward import adapters_off, backbone, hidden_states, top_layers
from engine.packing import ROW_TOKENS, Layout, attention_kind, pack


def layout_for(*models: nn.Module, note: Callable[[str], None] | None = None) -> Layout:
    """The packing every one of `models` reads right: rows of ROW_TOKENS if each keeps
    packed sequences apart, else a row each; a shared prefix if each also takes a
    custom attention mask. `note` hears about each fallback from the fast layout."""
    note = note or (lambda message: None)
    apart = [packs_sequences(m) for m in models]
    if not all(apart):
        names = ", ".join(sorted({type(m).__name__ for m, ok in zip(models, apart, strict=True) if not ok}))
        note(f"one sequence per row in forward passes: {names} attends across packed sequences (slower, same numbers)")
        return Layout(row_tokens=0, share_prefix=False)
    shared = [shares_prefix(m) for m in models]
    if not all(shared):
        kinds = ", ".join(sorted({f"{type(m).__name__} ({attention_kind(m)})" for m, ok in zip(models, shared, strict=True) if not ok}))
        note(f"packed without a shared prompt prefix: {kinds} takes no custom attention mask (slower, same numbers)")
    return Layout(ROW_TOKENS, share_prefix=all(shared))


def packs_sequences(model: nn.Module) -> bool:
    """Whether `model` keeps packed sequences apart (transformers' packed masks need
    position ids and the shared mask utilities; a model without them would attend
    across sequences)."""
    return _try_layout(model, Layout(share_prefix=False))


def shares_prefix(model: nn.Module) -> bool:
    """Whether `model` reads a packed batch with a shared prefix right: its attention
    must take a custom 4D mask (SDPA and eager do, in the form `Packed.inputs` gives;
    variable-length kernels such as FlashAttention do not)."""
    return attention_kind(model) in ("sdpa", "eager") and _try_layout(model, Layout(share_prefix=True))


def _toy_batch(model: nn.Module):
    """Two short sequences that share their first two tokens, the second response
    shorter: (queries, responses, response_mask) on the model's device."""
    device = next(model.parameters()).device
    queries = torch.tensor([[3, 4, 5], [3, 4, 7]], device=device)
    responses = torch.tensor([[6, 9], [8, 0]], device=device)
    return queries, responses, torch.tensor([[True, True], [True, False]], device=device)


def _try_layout(model: nn.Module, layout: Layout) -> bool:
    """Two sequences that share their first two tokens, packed in one row, against each alone."""
    queries, responses, response_mask = _toy_batch(model)
    packed = pack(queries, torch.ones_like(queries), responses, response_mask, layout)
    if layout.share_prefix and packed.prefix != 2:
        return False
    with torch.no_grad():
        together = hidden_states(model, packed).flatten(0, 1)[packed.last].float()
        alone = torch.stack([
            backbone(model)(input_ids=torch.cat([queries[b], responses[b][response_mask[b]]])[None], use_cache=False).last_hidden_state[0, -1].float()
            for b in range(2)
        ])
    return bool((together - alone).abs().max() <= 1e-3 * alone.abs().max().clamp(min=1e-6))


def runs_top_layers(model: nn.Module, n: int) -> bool:
    """Whether feeding the hidden states entering the top `n` layers, with only those
    layers, gives the full forward's output: true of the Llama family; not of a model
    that scales or adds to `inputs_embeds`, or lays its layers out otherwise. Tried on
    two short packed sequences, like `packs_sequences`."""
    body = backbone(model)
    if not isinstance(getattr(body, "layers", None), nn.ModuleList) or not 0 < n < len(body.layers):
        return False
    queries, responses, response_mask = _toy_batch(model)
    packed = pack(queries, torch.ones_like(queries), responses, response_mask, layout_for(model))
    split = len(body.layers) - n
    try:
        with torch.no_grad(), adapters_off(model):
            full = body(**packed.inputs(model), output_hidden_states=True)
            with top_layers(model, n) as top:
                part = top(inputs_embeds=full.hidden_states[split], **{k: v for k, v in packed.inputs(model).items() if k != "input_ids"}).last_hidden_state
    except Exception:  # a backbone that cannot take inputs_embeds this way
        return False
    expected = full.last_hidden_state.float()
    return bool((part.float() - expected).abs().max() <= 1e-4 * expected.abs().max().clamp(min=1e-6))
