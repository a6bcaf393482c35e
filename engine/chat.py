"""Chat prompts as token ids: exactly what the policy continues from. Torch-free, so
the stages can validate prompt lengths without loading the model side."""

from __future__ import annotations


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt up to the assistant's turn; the reward model, PPO and
    sampling all build on these."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user_prompt(text: str) -> list[dict]:
    """A one-turn chat prompt."""
    return [{"role": "user", "content": text}]
