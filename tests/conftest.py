"""Shared fixtures: a tiny randomly initialised causal LM and tokenizer, built in
seconds with no network, and helpers to write run configs around it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def launch_env(**extra: str) -> dict:
    """The environment of a test's multi-process launch: CPU processes with gloo, as CI runs
    them, also on a machine with a GPU, where two ranks on its one device would fail under
    NCCL; one thread each, as two processes share CI's two cores."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **extra}


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers) each worker, and every process a
    test starts, takes its share of the cores: torch's default of one thread per core in
    each would oversubscribe them (a killed-and-resumed run took three times as long)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(items):
    """The longest files first (the real model, then the files that launch processes), so
    that the workers, which take whole files in this order, finish together."""
    def rank(item) -> int:
        return 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("launches") else 2

    items.sort(key=rank)  # stable: each file's tests keep their order

ROOT = Path(__file__).resolve().parent.parent
DEMO_SFT = ROOT / "configs" / "data" / "demo_sft.jsonl"
CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}"
)


def make_tokenizer(chat_template: str | None = CHATML, eos: str = "<|im_end|>", pad: str | None = "<|im_end|>"):
    """A byte-level BPE tokenizer trained on the demo set. By default it pads with
    EOS, like SmolLM2, so the base stage has something to fix."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line) for line in DEMO_SFT.read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([f"{r['prompt']}\n{r['response']}" for r in texts] + ["system user assistant"], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad)
    if chat_template:
        hf.chat_template = chat_template
    return hf


def make_model(tokenizer, hidden: int = 32, layers: int = 2, seed: int = 0, arch: str = "llama"):
    """A tiny random causal LM: Llama (rotary positions, the default) or GPT-2 (learned
    absolute positions, Conv1D layers), so the stages are tried on more than one kind."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny(folder: Path, hidden: int = 32, layers: int = 2, arch: str = "llama", **tokenizer_kwargs) -> Path:
    tokenizer = make_tokenizer(**tokenizer_kwargs)
    model = make_model(tokenizer, hidden=hidden, layers=layers, arch=arch)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama-style model folder as a user might bring one: pad == EOS."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 model folder: learned absolute positions and Conv1D layers."""
    return save_tiny(tmp_path_factory.mktemp("tiny_gpt2") / "model", arch="gpt2")


@pytest.fixture(scope="session")
def sft_rows() -> list[dict]:
    return [json.loads(line) for line in DEMO_SFT.read_text().splitlines()]


def crash_when_promoting(monkeypatch, stage: str):
    """Moving `stage`'s finished folder into place fails, as a crash there would; returns
    the real promote, to put back."""
    from pipeline import checkpoint as ckpt

    promote = ckpt.promote

    def crash(run_dir, name):
        if name == stage:
            raise OSError("disk gone")
        return promote(run_dir, name)

    monkeypatch.setattr(ckpt, "promote", crash)
    return promote


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TINY_SFT = {
    "max_steps": 6,
    "batch_size": 4,
    "learning_rate": 1e-3,
    "warmup_ratio": 0.0,
    "max_length": 96,
    "save_steps": 3,
    "logging_steps": 1,
    "num_samples": 2,
    "sample_max_new_tokens": 8,
}


def tiny_config(tmp_path: Path, model_dir: Path, train: Path, name: str = "tiny", sft: dict | None = None, base: dict | None = None, eval_path: Path | None = None, **stages: dict) -> Path:
    """A run config for the tiny model, written next to the run's output folder;
    `stages` adds later stages' sections (rm=..., rlhf=...). Training stages run in fp32
    unless a section says otherwise: "auto" means bf16 autocast on a GPU, and the tests
    compare numbers at fp32 tolerances (tests/stages/test_precision.py runs bf16)."""
    data = {"train": str(train), "eval": str(eval_path) if eval_path else None, "eval_fraction": 0.2}
    config = {
        "run": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 0},
        "base": {"model": str(model_dir), **(base or {})},
        "sft": {"data": data, **TINY_SFT, **(sft or {})},
        **stages,
    }
    for stage in ("sft", "rm", "dpo", "rlhf"):
        if isinstance(config.get(stage), dict):
            config[stage] = {"precision": "fp32", **config[stage]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


TINY_RM = {
    "max_steps": 30,
    "batch_size": 8,
    "learning_rate": 3e-3,
    "warmup_ratio": 0.0,
    "max_length": 96,
    "save_steps": 10,
    "logging_steps": 5,
}


def planted_rankings(sft_rows: list[dict], n: int, marker: str = " Cheers!") -> list[dict]:
    """Rankings where a completion wins exactly when it carries `marker`: scored lists
    of K = 2..4 (the marked ones tied at the top) and plain chosen/rejected pairs."""
    rows = []
    for i, row in enumerate(sft_rows[:n]):
        plain = [row["response"], row["response"] + " Sure.", "Well. " + row["response"]]
        k = 2 + i % 3
        if i % 4 == 3:
            rows.append({"prompt": row["prompt"], "chosen": row["response"] + marker, "rejected": plain[0]})
            continue
        marked = [c + marker for c in plain[: k - 1]][: 1 + i % 2]
        completions = plain[: k - len(marked)] + marked
        rows.append({"prompt": row["prompt"], "completions": completions, "scores": [0] * (k - len(marked)) + [1] * len(marked)})
    return rows


def load_config(path, overrides=()):
    """The config at `path` validated against the project's stage registry, as the CLI does."""
    from pipeline import config as configuration
    from stages import config_classes

    return configuration.load(path, list(overrides), config_classes())


# ---------------------------------------------------------------- PPO: a policy, a planted reward model, prompts

PLANTED = "Cheers"


@pytest.fixture(scope="session")
def policy_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model after the base stage, standing in for an SFT checkpoint."""
    from stages import base

    out = tmp_path_factory.mktemp("policy")
    base.run(base.BaseConfig(model=str(tiny_model_dir)), {}, out, seed=0)
    return out


@pytest.fixture(scope="session")
def planted_rm(policy_dir, tmp_path_factory):
    """A reward model that scores a response by its last token's embedding along the
    planted token's: its two layers add nothing to the residual stream (zero output
    projections), so the score is a fixed function of that token, highest for the
    planted one. The layers are there for a value adapter to sit on."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    planted = tokenizer(PLANTED, add_special_tokens=False)["input_ids"][0]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        direction = model.model.embed_tokens.weight[planted]
        model.score.weight.copy_(4 * direction / direction.norm())
    folder = tmp_path_factory.mktemp("planted_rm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def prompts(sft_rows, tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", [{"prompt": r["prompt"]} for r in sft_rows[:72]])


def ppo_config(prompts, **settings):
    """A small PPO config (stages.rlhf.RlhfConfig) on `prompts`, with `settings` on top; fp32
    as in tiny_config."""
    from stages import rlhf

    values = {
        "data": rlhf.RlhfData(prompts=str(prompts), eval_fraction=0.125),
        "steps": 4, "batch_size": 8, "minibatch_size": 4, "microbatch_size": 2, "ppo_epochs": 2,
        "learning_rate": 3e-3, "max_new_tokens": 6, "temperature": 1.0, "normalize_scores": False,
        "missing_eos_penalty": 0.0, "save_steps": 2, "sample_steps": 1, "eval_batch_size": 16, "num_samples": 2,
        "precision": "fp32",
    }
    return rlhf.RlhfConfig(**{**values, **settings})


def history(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def perturb_adapters(model, seed: int = 0) -> None:
    """LoRA's B starts at zero (adapters are no-ops); give every adapter a real effect."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
