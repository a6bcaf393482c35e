"""Settings more than one stage uses: LoRA, and the trainer settings SFT and RM share
(each stage's config class extends `TrainerSettings` with its own data and extras,
and may change a default by declaring the field again)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from pipeline.config import ConfigError, SettingError, resolve_local, setting


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    """Rank of the low-rank update."""
    alpha: int = 32
    """Scale of the update (alpha / r)."""
    dropout: float = 0.05
    target_modules: str = "all-linear"
    """Which linear layers get adapters: "all-linear" or a comma-separated list of module names."""

    def __post_init__(self):
        # peft accepts these at config time and fails only when it builds the layers,
        # which would be after the upstream stages ran.
        if self.r < 1:
            raise SettingError("r", f"must be at least 1, got {self.r}")
        if self.alpha <= 0:
            raise SettingError("alpha", f"must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise SettingError("dropout", f"must be in [0, 1), got {self.dropout}")
        if not [m for m in self.target_modules.split(",") if m.strip()]:
            raise SettingError("target_modules", "must name at least one module (or all-linear)")

    def peft_config(self, task_type: str | None, dropout: float | None = None, *, model=None, key: str = "lora"):
        """peft's LoraConfig. For SEQ_CLS, peft also trains and saves the new scalar head
        in full. `dropout` overrides the setting (PPO runs without dropout). With `model`,
        named target modules it lacks are refused in one line naming `key` (peft's own
        error comes as the trainer wraps the model, a traceback)."""
        from peft import LoraConfig

        modules = self.target_modules if self.target_modules == "all-linear" else [m.strip() for m in self.target_modules.split(",")]
        if model is not None and modules != "all-linear":
            names = [name for name, _ in model.named_modules()]
            missing = [m for m in modules if not any(name == m or name.endswith(f".{m}") for name in names)]
            if missing:
                linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if type(module).__name__ == "Linear"})
                raise ConfigError(f"{key}.target_modules: {', '.join(missing)} not in the model (its linear layers: {', '.join(linear)})")
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout if dropout is None else dropout, target_modules=modules, task_type=task_type)


@dataclass(frozen=True)
class TrainerSettings:
    init_from: str | None = setting(None, path="local", fingerprint=False)
    """Start from this model folder instead of the parent stage's checkpoint."""
    data: object = None
    """The stage's data section; each stage declares its own type here, so it stays second."""
    method: Literal["full", "lora"] = "full"
    lora: LoraSettings = LoraSettings()
    """Used when method is lora."""
    epochs: float = 1.0
    max_steps: int = -1
    """When > 0, train exactly this many optimiser steps and ignore `epochs`."""
    batch_size: int = 8
    """Examples per device per micro-step."""
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    """Tokens per sequence."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a GPU that supports it, fp32 otherwise."""
    activation_checkpointing: bool = setting(False, fingerprint=False)
    """Trade compute for activation memory; the result is the same."""
    save_steps: int = setting(25, fingerprint=False)
    """Steps between resumable checkpoints."""
    logging_steps: int = setting(5, fingerprint=False)
    report_to: tuple[str, ...] = setting(("none",), fingerprint=False)
    """Trainer loggers: none, tensorboard, wandb, trackio, ..."""

    def __post_init__(self):
        for name in ("batch_size", "gradient_accumulation_steps", "max_length", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise SettingError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise SettingError("epochs", "must be positive when max_steps is not set")
        if self.learning_rate <= 0:
            raise SettingError("learning_rate", f"must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:  # the Trainer reads 1 or more as a number of steps
            raise SettingError("warmup_ratio", f"must be in [0, 1), a share of the steps, got {self.warmup_ratio}")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise SettingError(name, f"must be >= 0 (0 is off), got {getattr(self, name)}")

    def unused(self) -> set[str]:
        """Settings that cannot matter for this config, left out of the fingerprint."""
        return {"lora"} if self.method == "full" else set()


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_folder(value: str | None, key: str, kind: Literal["causal", "classifier", "any"] = "any") -> None:
    """A folder the user named in place of a stage's input must hold a model, with its
    weights, of the kind the stage reads: a causal LM (a policy) or a sequence classifier
    (a reward model). Read from config.json alone, before anything trains."""
    if value is None:
        return
    folder = resolve_local(value, hub_allowed=False)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key}: {value} is not a model folder (no config.json)")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"{key}: {value} has no weights ({', '.join(WEIGHT_FILES)})")
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{key}: {value}/config.json is not a readable model config ({e})") from None
    causal, classifier = is_causal_lm(architectures), any(a.endswith("ForSequenceClassification") for a in architectures)
    if architectures and ((kind == "causal" and not causal) or (kind == "classifier" and not classifier)):
        wanted = "a causal language model" if kind == "causal" else "a sequence-classification (reward) model"
        raise ConfigError(f"{key}: {value} is a {', '.join(architectures)}, not {wanted}")


def is_causal_lm(architectures: list[str]) -> bool:
    """Whether a config's saved architectures name a causal LM. The names decide: a BERT
    encoder's config type also maps to a causal-LM class (BertLMHeadModel), but its
    weights are not one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set()
    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update([names] if isinstance(names, str) else names)
    return any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def check_loggers(names: tuple[str, ...], key: str) -> None:
    """Unknown or uninstalled loggers fail before training, not after the first stages ran."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    known = ("none", "all", *INTEGRATION_TO_CALLBACK)
    installed = get_available_reporting_integrations()
    for name in names:
        if name not in known:
            raise ConfigError(f"{key}: unknown logger {name!r} (known: {', '.join(known)})")
        if name not in ("none", "all") and name not in installed:
            raise ConfigError(f"{key}: {name!r} is not installed in this environment (pip install {name} into .venv)")


def check_lora(cfg, key: str) -> None:
    """LoRA settings the library itself rejects fail before anything runs."""
    if cfg.method != "lora":
        return
    try:
        cfg.lora.peft_config(None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None
