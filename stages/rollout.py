"""The model side of PPO: the policy-and-value module, sampling, and the forward
passes that turn a batch of prompts into a `Rollout`.

Every forward pass here sees the same tensors: the left-padded prompt, then the
response cut after its first EOS, with position ids counted over real tokens only.
So a token gets the same log-probability when the rollout scores it and when the
update recomputes it, whatever padding its neighbours needed.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from stages import ppo


@dataclass
class Rollout:
    """One PPO batch. Shapes: (batch, prompt_len) for the prompt, (batch, response_len)
    for per-token fields, (batch,) for per-episode ones."""

    queries: torch.Tensor  # prompt ids, left-padded
    query_mask: torch.Tensor  # 1 on real prompt tokens
    responses: torch.Tensor  # sampled ids, pad after the first EOS
    response_mask: torch.Tensor  # bool, true up to and including the first EOS
    ended: torch.Tensor  # (batch,) bool: the response produced an EOS
    ref_logprobs: torch.Tensor | None  # log pi_ref(token), INVALID_LOGPROB off the mask
    scores: torch.Tensor | None  # (batch,) raw reward-model scores, read at the last real token
    logprobs: torch.Tensor | None = None  # log pi_old(token), INVALID_LOGPROB off the mask
    values: torch.Tensor | None = None  # V_old(prefix), 0 off the mask
    value_inputs: torch.Tensor | None = None  # (batch, prompt_len + response_len, hidden): the reward model's hidden states entering the value's first layer, when the value runs only its top layers

    def set_old(self, logprobs: torch.Tensor, values: torch.Tensor) -> None:
        """Record the policy's log-probs and values at rollout time, masked."""
        self.logprobs = torch.where(self.response_mask, logprobs, torch.full_like(logprobs, ppo.INVALID_LOGPROB))
        self.values = torch.where(self.response_mask, values, torch.zeros_like(values))

    def pack(self, layout: Layout) -> Packed:
        packed = pack(self.queries, self.query_mask, self.responses, self.response_mask, layout)
        if self.value_inputs is not None:
            packed.value_inputs = packed.from_grid(self.value_inputs)
        return packed

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(**{k: v[index] if v is not None else None for k, v in vars(self).items()})


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over real tokens; left padding gets 0 (it is masked anyway). The
    same rule `generate` uses, so sampling and scoring agree."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def backbone(model: nn.Module) -> nn.Module:
    """The transformer under a causal-LM or sequence-classification head (with any
    LoRA layers, which live inside it)."""
    if hasattr(model, "get_base_model"):  # a peft model
        model = model.get_base_model()
    return model.base_model


ROW_TOKENS = 1024
"""Longest packed row, unless one sequence is longer on its own. Attention kernels without
variable-length support build a (row, row) mask per row; this bounds it."""


@dataclass(frozen=True)
class Layout:
    """How `pack` lays out sequences: up to `row_tokens` per row (0: one sequence per
    row, for models that attend across packed sequences), and with `share_prefix`
    the prompt tokens every sequence starts with once per row (a chat template's
    system prompt: SmolLM2's is 24 of the demo prompts' 41 tokens on average)."""

    row_tokens: int = ROW_TOKENS
    share_prefix: bool = True


@dataclass
class Packed:
    """A batch of prompt + response sequences laid end to end in rows, without padding,
    for every forward pass after sampling. Padded, a batch of uneven prompts and of
    responses that mostly stop early is about a third padding, and every forward and
    backward paid for it.

    Each sequence keeps the position ids it has alone. Without a shared prefix they
    restart at 0 for each sequence, and transformers builds the block-causal mask from
    them. With one, each row starts with the prefix, the sequences after it hold only
    what follows it, and `attention_mask` lets each attend to the prefix and to itself:
    the prefix attends only to itself, so its keys and values are the ones every
    sequence computes alone, computed once."""

    input_ids: torch.Tensor  # (rows, row_len); filler after the last sequence of a row
    position_ids: torch.Tensor  # (rows, row_len)
    predicts: torch.Tensor  # (rows, row_len) bool: the token before a real response token, whose output predicts it and is the state it was chosen in
    last: torch.Tensor  # (batch,) flat position of each sequence's last real token (its EOS when it has one)
    response_mask: torch.Tensor  # (batch, response_len) bool
    tokens: torch.Tensor  # (n,) the real response tokens, sequence by sequence
    source: torch.Tensor | None = None  # (rows, row_len): where each packed token sits in the (batch, prompt_len + response_len) grid, flattened
    place: torch.Tensor | None = None  # (batch, prompt_len + response_len): where each grid token sits in the packed rows, flattened (0 on padding)
    attention_mask: torch.Tensor | None = None  # (rows, 1, row_len, row_len) bool, true where a query may attend a key; None without a shared prefix
    prefix: int = 0  # tokens shared at the start of every row
    value_inputs: torch.Tensor | None = None  # (rows, row_len, hidden), laid out from Rollout.value_inputs

    # Sequences are laid out in batch order, so positions taken from `predicts` in
    # memory order line up with `tokens` and with the true entries of `response_mask`.

    def unpack(self, flat: torch.Tensor, fill: float) -> torch.Tensor:
        """Per-token values (n,) back onto the (batch, response_len) grid, `fill` off the mask."""
        grid = torch.full(self.response_mask.shape, fill, dtype=flat.dtype, device=flat.device)
        return grid.index_put((self.response_mask,), flat)

    def to_grid(self, states: torch.Tensor) -> torch.Tensor:
        """Per-position states of these rows, (rows, row_len, ...), onto the unpacked
        (batch, prompt_len + response_len, ...) grid; padding gets a copy of some real state."""
        return states.flatten(0, 1)[self.place]

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_grid` for this packing (filler gets some real state)."""
        return grid.flatten(0, 1)[self.source]

    def inputs(self, model: nn.Module) -> dict:
        """Keyword arguments for `model`'s forward: ids, positions and, with a shared
        prefix, the mask in the form its attention kernel takes."""
        kwargs = {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}
        if self.attention_mask is not None:
            if _attention(model) == "eager":  # eager attention adds the mask to its scores
                dtype = next(model.parameters()).dtype
                kwargs["attention_mask"] = torch.zeros(self.attention_mask.shape, dtype=dtype, device=self.attention_mask.device).masked_fill(~self.attention_mask, torch.finfo(dtype).min)
            else:
                kwargs["attention_mask"] = self.attention_mask
        return kwargs


def pack(queries, query_mask, responses, response_mask, layout: Layout = Layout()) -> Packed:
    """Lay each (left-padded prompt, right-padded response) end to end: consecutive
    sequences share a row while it stays within `layout.row_tokens`. With row_tokens=0
    each sequence gets a row of its own, right-padded, which any causal model reads
    right without packing support. No real token attends to the filler (token 0)
    after the sequences of a row, so its id does not matter."""
    device = queries.device
    ids = torch.cat([queries, responses], 1)
    real = torch.cat([query_mask.bool(), response_mask.bool()], 1)
    sequences = [ids[b][real[b]] for b in range(ids.shape[0])]
    prompt_lengths = query_mask.long().sum(1)
    prefix = _common_prefix(sequences, int(prompt_lengths.min()) - 1) if layout.share_prefix and layout.row_tokens else 0
    lengths = [len(s) - prefix for s in sequences]  # what each sequence adds to a row
    rows: list[list[int]] = [[]]
    for b, n in enumerate(lengths):
        if rows[-1] and prefix + sum(lengths[i] for i in rows[-1]) + n > layout.row_tokens:
            rows.append([])
        rows[-1].append(b)
    width = max(prefix + sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.zeros((len(rows), width), dtype=ids.dtype, device=device)
    positions = torch.arange(width, device=device).repeat(len(rows), 1)  # the filler counts 0, 1, ...: a sequence of its own
    segments = torch.full((len(rows), width), -1, device=device)  # 0: the prefix, k: the row's k-th sequence, -1: filler
    start = [0] * len(lengths)  # flat position of each sequence's first token, had its prefix been laid out with it
    columns = [real[b].nonzero().squeeze(-1) + b * ids.shape[1] for b in range(ids.shape[0])]  # each sequence's real tokens in the flat grid
    source = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    place = torch.zeros(ids.numel(), dtype=torch.long, device=device)
    for r, row in enumerate(rows):
        input_ids[r, :prefix] = sequences[0][:prefix]
        positions[r, :prefix] = torch.arange(prefix, device=device)
        segments[r, :prefix] = 0
        source[r, :prefix] = columns[row[0]][:prefix]
        offset = prefix
        for k, b in enumerate(row, start=1):
            n = lengths[b]
            input_ids[r, offset : offset + n] = sequences[b][prefix:]
            positions[r, offset : offset + n] = torch.arange(prefix, prefix + n, device=device)
            segments[r, offset : offset + n] = k
            source[r, offset : offset + n] = columns[b][prefix:]
            place[columns[b][:prefix]] = r * width + torch.arange(prefix, device=device)
            place[columns[b][prefix:]] = r * width + offset + torch.arange(n, device=device)
            start[b] = r * width + offset - prefix
            offset += n
        positions[r, offset:] = torch.arange(width - offset, device=device)
    attention_mask = None
    if prefix:
        causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
        same = segments[:, :, None] == segments[:, None, :]
        attention_mask = (causal & (same | (segments[:, None, :] == 0)))[:, None]
    start_t = torch.tensor(start, device=device)
    steps = torch.arange(responses.shape[1], device=device)
    before = (start_t + prompt_lengths - 1)[:, None] + steps[None, :]
    predicts = torch.zeros(input_ids.numel(), dtype=torch.bool, device=device)
    predicts[before[response_mask.bool()]] = True
    return Packed(
        input_ids=input_ids,
        position_ids=positions,
        predicts=predicts.view_as(input_ids),
        last=start_t + prefix + torch.tensor(lengths, device=device) - 1,
        response_mask=response_mask.bool(),
        tokens=responses[response_mask.bool()],
        source=source,
        place=place.view_as(ids),
        attention_mask=attention_mask,
        prefix=prefix,
    )


def _common_prefix(sequences: list[torch.Tensor], limit: int) -> int:
    """How many leading tokens every sequence shares, at most `limit` (so that each keeps
    at least its last prompt token, whose output is its own: the state its first
    response token was chosen in)."""
    if len(sequences) < 2 or limit <= 0:
        return 0
    first = sequences[0][:limit]
    n = len(first)
    for seq in sequences[1:]:
        differs = (seq[:n] != first[:n]).nonzero()
        n = int(differs[0]) if len(differs) else min(n, len(seq))
        if n == 0:
            return 0
    return n


def layout_for(*models: nn.Module) -> Layout:
    """The packing every one of `models` reads right: rows of ROW_TOKENS if each keeps
    packed sequences apart, else a row each; a shared prefix if each also takes a
    custom attention mask."""
    if not all(packs_sequences(m) for m in models):
        return Layout(row_tokens=0, share_prefix=False)
    return Layout(ROW_TOKENS, share_prefix=all(shares_prefix(m) for m in models))


_PACKS: dict[tuple, bool] = {}


def _attention(model: nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def packs_sequences(model: nn.Module) -> bool:
    """Whether `model` keeps packed sequences apart, tried on two short ones rather than
    assumed (transformers' packed masks need position ids and the shared mask
    utilities; a model without them would attend across sequences). Remembered per
    implementation and attention kernel."""
    key = ("packs", type(backbone(model)), _attention(model))
    if key not in _PACKS:
        _PACKS[key] = _try_layout(model, Layout(share_prefix=False))
    return _PACKS[key]


def shares_prefix(model: nn.Module) -> bool:
    """Whether `model` reads a packed batch with a shared prefix right: its attention
    must take a custom 4D mask (SDPA and eager do, in the form `Packed.inputs` gives;
    variable-length kernels such as FlashAttention do not), tried like `packs_sequences`."""
    if _attention(model) not in ("sdpa", "eager"):
        return False
    key = ("prefix", type(backbone(model)), _attention(model))
    if key not in _PACKS:
        _PACKS[key] = _try_layout(model, Layout(share_prefix=True))
    return _PACKS[key]


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


class PolicyAndValue(nn.Module):
    """Policy and value as one module, so one optimiser, one `accelerator.prepare` and
    one backward serve both. Four layouts:

    separate, full   the policy, and a sequence-classification value model (two models)
    separate, LoRA   one peft model with adapters "policy" and "value" on the shared
                     frozen SFT weights, plus the value head; the reference is that
                     model with adapters disabled
    reward, LoRA     the policy adapter on the SFT weights, and the value adapter and
                     head on the frozen reward model, which scores with it disabled: the
                     value starts as exactly the reward model (InstructGPT's start) and
                     with `value_top` runs only its top layers, from the reward model's
                     hidden states there (`Rollout.value_inputs`)
    shared           a value head on the policy's own last hidden states: one forward
                     gives log-probs and values, so each step runs one forward and one
                     backward fewer (full or LoRA)
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module | None = None, head: nn.Module | None = None, lora: bool = False, shared: bool = False, value_top: int | None = None):
        super().__init__()
        assert value_model is not None or head is not None, "a value model, a value head or both"
        self.policy = policy
        self.value_model = value_model
        self.head = head
        self.lora = lora
        self.shared = shared
        self.value_top = value_top

    @property
    def value_head(self) -> nn.Module:
        return self.head if self.head is not None else self.value_model.score

    @property
    def on_reward_model(self) -> bool:
        return self.value_model is not None and self.head is not None

    def use(self, adapter: str) -> None:
        if not self.lora:
            return
        if not self.shared:
            self.policy.base_model.set_adapter(adapter)
        for name, p in self.policy.named_parameters():  # set_adapter and disable_adapter freeze inactive adapters
            if "lora_" in name:
                p.requires_grad_(True)

    @contextmanager
    def merged_policy(self):
        """LoRA: the policy adapter folded into a temporary copy of each weight it adapts,
        for sampling. Each generated token then runs one matmul per linear layer instead
        of three (about a fifth of the generation time on a CPU), at the cost of that
        copy while sampling. Afterwards the frozen weights are the very tensors they were:
        unmerging by subtraction would round them away from the SFT model, which they
        must stay as the reference. Layouts this cannot fold safely (sharded or quantised
        weights, DoRA) sample unmerged; the sampled distribution is the policy's either
        way, up to float rounding."""
        folded = _foldable_lora_layers(self.policy) if self.lora else None
        if not folded:
            yield
            return
        originals = []
        try:
            for layer in folded:
                base = layer.get_base_layer()
                originals.append((base, base.weight))
                base.weight = nn.Parameter(base.weight + layer.get_delta_weight("policy").to(base.weight.dtype), requires_grad=False)
            with self.policy.disable_adapter():
                yield
        finally:
            for base, weight in originals:
                base.weight = weight
            self.use("policy")

    def reference_logprobs(self, packed: Packed, temperature: float) -> torch.Tensor:
        """LoRA mode: log-probs under the shared weights with every adapter off, which is
        the SFT model because the SFT stage hands over a merged folder. (n,)"""
        with self.policy.disable_adapter():
            logits = response_logits(self.policy, packed)
        self.use("policy")
        return ppo.logprobs_from_logits(logits, packed.tokens, temperature)

    def forward(self, packed: Packed, temperature: float, ptx=None):
        """(log-probs of each response token under the policy, values, entropy), each
        (batch, response_len) with INVALID_LOGPROB / 0 / 0 off the mask, and the PPO-ptx
        language-modelling loss on `ptx` = (input_ids, attention_mask, labels), or None."""
        self.use("policy")
        if self.shared:
            logits, hidden = response_logits(self.policy, packed, output_hidden_states=True)
            values = self.head(hidden).squeeze(-1).float()
        elif self.on_reward_model:
            logits = response_logits(self.policy, packed)
            values = self._values_on_reward_model(packed)
        else:
            logits = response_logits(self.policy, packed)
            self.use("value")
            values = token_values(self.policy if self.lora else self.value_model, self.value_head, packed)
            self.use("policy")
        logprobs = ppo.logprobs_from_logits(logits, packed.tokens, temperature)
        with torch.no_grad():
            entropy = ppo.entropy_from_logits(logits, temperature)
        ptx_loss = None
        if ptx is not None:
            ids, mask, labels = ptx
            ptx_loss = self.policy(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        return packed.unpack(logprobs, ppo.INVALID_LOGPROB), packed.unpack(values, 0.0), packed.unpack(entropy, 0.0), ptx_loss


    def _values_on_reward_model(self, packed: Packed) -> torch.Tensor:
        """The "reward" layout's values: (n,) float32. With `value_top`, the layers below
        it carry no adapter, so their output is the reward model's, recorded while it
        scored the batch; only the top layers run again, with the value adapter."""
        if self.value_top and packed.value_inputs is not None:
            inputs = packed.inputs(self.value_model)
            del inputs["input_ids"]
            with top_layers(self.value_model, self.value_top) as top:
                hidden = top(inputs_embeds=packed.value_inputs, **inputs).last_hidden_state
        else:
            hidden = hidden_states(self.value_model, packed)
        return self.value_head(hidden[packed.predicts]).squeeze(-1).float()


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


@torch.no_grad()
def sample(policy: nn.Module, queries, query_mask, generation_config) -> torch.Tensor:
    """Responses (batch, max_new_tokens), padded with pad after the EOS and to full length.

    Greedy and plain temperature sampling (what PPO should use) go through the short loop
    below; top-k, top-p and anything else go through `generate`."""
    c = generation_config
    if not (c.top_k or 0) and (c.top_p is None or c.top_p >= 1.0) and c.num_return_sequences in (None, 1):
        temperature = (c.temperature or 1.0) if c.do_sample else 0.0
        return _sample_plain(policy, queries, query_mask, temperature, c.max_new_tokens, c.eos_token_id, c.pad_token_id)
    out = policy.generate(input_ids=queries, attention_mask=query_mask, generation_config=generation_config)
    responses = out[:, queries.shape[1] :]
    width = generation_config.max_new_tokens
    if responses.shape[1] < width:  # every row stopped early
        pad = torch.full((responses.shape[0], width - responses.shape[1]), generation_config.pad_token_id, dtype=responses.dtype, device=responses.device)
        responses = torch.cat([responses, pad], dim=1)
    return responses


def _sample_plain(policy: nn.Module, queries, query_mask, temperature: float, max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Token by token with a KV cache; temperature 0 is greedy. The draw is by inverse
    CDF (one uniform number per row), the same categorical distribution `generate`
    samples with multinomial but without its vocabulary-sized exponential draw, which
    costs about a tenth of the generation time on a CPU."""
    from transformers import DynamicCache

    batch = queries.shape[0]
    mask = query_mask.clone()
    positions = position_ids(mask)
    step_input, cache = queries, DynamicCache()
    responses = torch.full((batch, max_new_tokens), pad_token_id, dtype=queries.dtype, device=queries.device)
    done = torch.zeros(batch, dtype=torch.bool, device=queries.device)
    eos = torch.tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id], device=queries.device)
    for t in range(max_new_tokens):
        logits = policy(input_ids=step_input, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        if temperature > 0:
            cdf = torch.softmax(logits / temperature, dim=-1).cumsum(-1)
            u = torch.rand(batch, 1, device=cdf.device) * cdf[:, -1:]
            token = torch.searchsorted(cdf, u).clamp(max=cdf.shape[-1] - 1).squeeze(-1)
        else:
            token = logits.argmax(-1)
        responses[:, t] = torch.where(done, torch.full_like(token, pad_token_id), token)
        done |= torch.isin(token, eos)
        if done.all():
            break
        step_input = token.unsqueeze(-1)
        mask = torch.cat([mask, torch.ones_like(step_input)], dim=1)
        positions = positions[:, -1:] + 1
    return responses


@torch.no_grad()
def make_rollout(model: PolicyAndValue, reference, reward_model, queries, query_mask, generation_config, temperature: float, eos_token_id: int, pad_token_id: int, timer, layout: Layout = Layout(), policy_pass: bool = True, merge: bool = False) -> Rollout:
    """Sample responses and score them: reference log-probs, reward-model scores and,
    with `policy_pass`, the old log-probs and values (without it the caller takes
    them from the update's first forward). `reference` is None in LoRA mode
    (adapters disabled). `merge`: sample with the LoRA policy folded (`merged_policy`)."""
    with timer("generation"):
        model.use("policy")
        with model.merged_policy() if merge else nullcontext():
            raw = sample(model.policy, queries, query_mask, generation_config)
    responses, mask, ended = ppo.truncate_after_eos(raw, eos_token_id, pad_token_id)
    width = int(ppo.sequence_lengths(mask).max())  # columns past the longest response hold only padding
    responses, mask = responses[:, :width], mask[:, :width]
    batch = Rollout(queries=queries, query_mask=query_mask, responses=responses, response_mask=mask, ended=ended, ref_logprobs=None, scores=None)
    packed = batch.pack(layout)
    with timer("scoring"):
        if model.value_top:
            batch.scores, batch.value_inputs = reward_scores(reward_model, packed, keep_layer=len(backbone(reward_model).layers) - model.value_top)
            packed.value_inputs = packed.from_grid(batch.value_inputs)
        else:
            batch.scores = reward_scores(reward_model, packed)
        if policy_pass:
            logprobs, values, _, _ = model(packed, temperature)
            batch.set_old(logprobs, values)
        if reference is None:
            ref_logprobs = model.reference_logprobs(packed, temperature)
        else:
            ref_logprobs = ppo.logprobs_from_logits(response_logits(reference, packed), packed.tokens, temperature)
        batch.ref_logprobs = packed.unpack(ref_logprobs, ppo.INVALID_LOGPROB)
    return batch
