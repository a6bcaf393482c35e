"""The model side of PPO: the policy-and-value module, sampling, and the forward
passes that turn a batch of prompts into a `Rollout`.

Every forward pass here sees the same tensors: the left-padded prompt, then the
response cut after its first EOS, with position ids counted over real tokens only.
So a token gets the same log-probability when the rollout scores it and when the
update recomputes it, whatever padding its neighbours needed.
"""

from __future__ import annotations

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
    logprobs: torch.Tensor  # log pi_old(token), INVALID_LOGPROB off the mask
    ref_logprobs: torch.Tensor  # log pi_ref(token)
    values: torch.Tensor  # V_old(prefix)
    scores: torch.Tensor  # (batch,) raw reward-model scores

    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.queries, self.responses], dim=1)

    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask.to(self.query_mask.dtype)], dim=1)

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(**{k: v[index] for k, v in vars(self).items()})


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


def token_scores(model: nn.Module, head: nn.Module, input_ids, attention_mask, context_len: int) -> torch.Tensor:
    """The head applied to every response position: (batch, response_len) float32.
    The value of a state is read at the token that ends it."""
    hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
    return head(hidden[:, context_len - 1 : -1]).squeeze(-1).float()


def response_logits(policy: nn.Module, input_ids, attention_mask, context_len: int) -> torch.Tensor:
    """Logits that predict each response token: (batch, response_len, vocab)."""
    response_len = input_ids.shape[1] - context_len
    out = policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False, logits_to_keep=response_len + 1)
    return out.logits[:, :-1]


class PolicyAndValue(nn.Module):
    """Policy and value as one module, so one optimiser, one `accelerator.prepare` and
    one backward serve both. Three layouts:

    separate, full   the policy, and a sequence-classification value model (two models)
    separate, LoRA   one peft model with adapters "policy" and "value" on the shared
                     frozen SFT weights, plus the value head; the reference is that
                     model with adapters disabled
    shared           a value head on the policy's own last hidden states: one forward
                     gives log-probs and values, so each step runs one forward and one
                     backward fewer (full or LoRA)
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module | None = None, head: nn.Module | None = None, lora: bool = False, shared: bool = False):
        super().__init__()
        assert (value_model is None) == (head is not None), "a value model or a value head, not both"
        self.policy = policy
        self.value_model = value_model
        self.head = head
        self.lora = lora
        self.shared = shared

    @property
    def value_head(self) -> nn.Module:
        return self.head if self.value_model is None else self.value_model.score

    def use(self, adapter: str) -> None:
        if not self.lora:
            return
        if not self.shared:
            self.policy.base_model.set_adapter(adapter)
        for name, p in self.policy.named_parameters():  # set_adapter and disable_adapter freeze inactive adapters
            if "lora_" in name:
                p.requires_grad_(True)

    def reference_logits(self, input_ids, attention_mask, context_len: int) -> torch.Tensor:
        """LoRA mode: the shared weights with every adapter off, which is the SFT model
        because the SFT stage hands over a merged folder."""
        with self.policy.disable_adapter():
            logits = response_logits(self.policy, input_ids, attention_mask, context_len)
        self.use("policy")
        return logits

    def forward(self, input_ids, attention_mask, context_len: int, temperature: float, ptx=None):
        """(logprobs of each token under the policy, values, entropy), all (batch, response_len),
        and the PPO-ptx language-modelling loss on `ptx` = (input_ids, attention_mask, labels), or None."""
        self.use("policy")
        tokens = input_ids[:, context_len:]
        if self.shared:
            hidden = backbone(self.policy)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
            hidden = hidden[:, context_len - 1 : -1]
            logits = self.policy.get_output_embeddings()(hidden)
            values = self.head(hidden).squeeze(-1).float()
        else:
            logits = response_logits(self.policy, input_ids, attention_mask, context_len)
            self.use("value")
            values = token_scores(self.policy if self.lora else self.value_model, self.value_head, input_ids, attention_mask, context_len)
            self.use("policy")
        logprobs = ppo.logprobs_from_logits(logits, tokens, temperature)
        with torch.no_grad():
            entropy = ppo.entropy_from_logits(logits, temperature)
        ptx_loss = None
        if ptx is not None:
            ids, mask, labels = ptx
            ptx_loss = self.policy(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        return logprobs, values, entropy, ptx_loss


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
def make_rollout(model: PolicyAndValue, reference, reward_model, queries, query_mask, generation_config, temperature: float, eos_token_id: int, pad_token_id: int, timer) -> Rollout:
    """Sample responses and score them: old log-probs, reference log-probs, values
    and reward-model scores. `reference` is None in LoRA mode (adapters disabled)."""
    with timer("generation"):
        model.use("policy")
        raw = sample(model.policy, queries, query_mask, generation_config)
    responses, mask, ended = ppo.truncate_after_eos(raw, eos_token_id, pad_token_id)
    context_len = queries.shape[1]
    input_ids = torch.cat([queries, responses], dim=1)
    attention_mask = torch.cat([query_mask, mask.to(query_mask.dtype)], dim=1)
    with timer("scoring"):
        logprobs, values, _, _ = model(input_ids, attention_mask, context_len, temperature)
        if reference is None:
            ref_logits = model.reference_logits(input_ids, attention_mask, context_len)
        else:
            ref_logits = response_logits(reference, input_ids, attention_mask, context_len)
        ref_logprobs = ppo.logprobs_from_logits(ref_logits, responses, temperature)
        per_token = token_scores(reward_model, reward_model.score, input_ids, attention_mask, context_len)
        lengths = ppo.sequence_lengths(mask)
        scores = per_token[torch.arange(len(lengths), device=lengths.device), lengths - 1]  # at the EOS, never at a pad
    invalid = torch.full_like(logprobs, ppo.INVALID_LOGPROB)
    return Rollout(
        queries=queries,
        query_mask=query_mask,
        responses=responses,
        response_mask=mask,
        ended=ended,
        logprobs=torch.where(mask, logprobs, invalid),
        ref_logprobs=torch.where(mask, ref_logprobs, invalid),
        values=torch.where(mask, values, torch.zeros_like(values)),
        scores=scores,
    )
