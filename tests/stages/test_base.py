"""The base stage on tiny local models: token fixes, a loadable folder, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import ConfigError
from stages import base
from tests.conftest import make_model, make_tokenizer, save_tiny


def run_base(model_dir: Path, out: Path, **settings) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    return base.run(base.BaseConfig(model=str(model_dir), **settings), {}, out, seed=0)


def test_local_folder_becomes_a_plain_checkpoint(tiny_model_dir, tmp_path):
    metrics = run_base(tiny_model_dir, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    # The source pads with EOS; padding gets a token of its own.
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert metrics["notes"] == ["pad token set to '<|endoftext|>' (was '<|im_end|>')"]
    assert metrics["parameters"] == sum(p.numel() for p in model.parameters())
    assert metrics["dtype"] == "float32" and metrics["architecture"] == "LlamaForCausalLM"
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (name, a), (_, b) in zip(source.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} changed"
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_dtype_is_applied(tiny_model_dir, tmp_path):
    metrics = run_base(tiny_model_dir, tmp_path / "out", dtype="bfloat16")
    assert metrics["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto").dtype == torch.bfloat16


def test_missing_chat_template_gets_a_default_and_says_so(tmp_path):
    folder = save_tiny(tmp_path / "plain", chat_template=None)
    metrics = run_base(folder, tmp_path / "out")
    assert metrics["chat_template"] == "default"
    assert any("no chat template" in note for note in metrics["notes"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False)
    assert text == "<|user|>\nhi<|im_end|>\n<|assistant|>\nyo<|im_end|>\n"


def test_eos_is_corrected_to_the_templates_end_of_turn(tmp_path):
    # A GGUF conversion that reads the wrong EOS: the template ends turns with <|im_end|>.
    folder = save_tiny(tmp_path / "wrong-eos", eos="<|endoftext|>", pad=None)
    metrics = run_base(folder, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert any("EOS set to '<|im_end|>'" in note for note in metrics["notes"])


def test_explicit_tokens_and_a_new_pad_token(tiny_model_dir, tmp_path):
    metrics = run_base(tiny_model_dir, tmp_path / "out", pad_token="<|pad|>")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == len(tokenizer) - 1
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert any("added a new pad token" in note for note in metrics["notes"])
    with pytest.raises(ConfigError, match=r"^base.eos_token: '<\|nope\|>' is not in the tokenizer's vocabulary$"):
        run_base(tiny_model_dir, tmp_path / "out2", eos_token="<|nope|>")
    with pytest.raises(ConfigError, match="must differ from EOS"):
        run_base(tiny_model_dir, tmp_path / "out3", pad_token="<|im_end|>")


def test_chat_template_file(tiny_model_dir, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>{% endfor %}")
    metrics = run_base(tiny_model_dir, tmp_path / "out", chat_template=str(template))
    assert metrics["chat_template"] == "file"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[user] x<|im_end|>"


def test_not_a_causal_lm_is_a_clear_error(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
    with pytest.raises(ConfigError) as e:
        run_base(folder, tmp_path / "out")
    assert str(e.value) == f"base.model: {folder} is a BertModel model, not a causal language model"


def test_folder_without_a_model_or_tokenizer(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=rf"^base.model: cannot read a model config from {empty}: "):
        run_base(empty, tmp_path / "out")
    weights_only = tmp_path / "weights-only"
    make_model(make_tokenizer()).save_pretrained(weights_only)
    with pytest.raises(ConfigError, match=rf"^base.model: cannot load the tokenizer of {weights_only}: "):
        run_base(weights_only, tmp_path / "out")


def test_unreachable_hub_id_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^base.model: cannot read a model config from nobody/nothing-here: "):
        run_base("nobody/nothing-here", tmp_path / "out")


def test_end_of_turn_detection(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert base.end_of_turn_token(tokenizer) == "<|im_end|>"
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert base.end_of_turn_token(tokenizer) is None


def test_manifest_free_output(tiny_model_dir, tmp_path):
    run_base(tiny_model_dir, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in saved


def test_a_chat_template_that_cannot_render_is_said_once_and_kept_in_the_manifest(tmp_path, capsys):
    from pipeline import cli
    from tests.conftest import tiny_config, write_jsonl

    template = tmp_path / "broken.jinja"
    # Renders prompts (so generation works) but refuses to render an assistant turn.
    template.write_text(
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ raise_exception('assistant turns are not supported') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    model = save_tiny(tmp_path / "model")
    path = tiny_config(tmp_path, model, write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "hi", "response": "hello"}] * 4), base={"chat_template": str(template)})
    assert cli.main(["run", "base", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "fallback: the chat template cannot render" in line]
    assert len(said) == 1 and "assistant turns are not supported" in said[0], out
    manifest = json.loads((tmp_path / "runs" / "tiny" / "base" / "manifest.json").read_text())
    assert len(manifest["fallbacks"]) == 1 and manifest["fallbacks"][0].startswith("the chat template cannot render")
    # SFT renders assistant turns, so it refuses that template in one line before training
    assert cli.main(["run", "sft", "--config", str(path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: sft: the chat template of ") and "assistant turns are not supported" in errors[0], errors
    assert not (tmp_path / "runs" / "tiny" / ".sft.partial").exists()


def test_weights_missing_or_truncated_are_one_line(tiny_model_dir, tmp_path):
    import shutil

    for name, damage in (("no-weights", lambda f: f.unlink()), ("truncated", lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]))):
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir, folder)
        damage(folder / "model.safetensors")
        with pytest.raises(ConfigError, match=rf"^base.model: cannot load the weights of {folder}: "):
            run_base(folder, tmp_path / "out")


def test_a_chat_template_of_the_users_that_does_not_parse_is_refused_before_anything_runs(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(ConfigError) as e:
        base.check(base.BaseConfig(model="x", chat_template=str(template)))
    assert str(e.value).startswith(f"base.chat_template: {template}:2: ")


def test_a_chat_template_that_cannot_render_a_prompt_is_one_line(tiny_model_dir, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ raise_exception('no prompts here') }}")
    with pytest.raises(ConfigError) as e:
        run_base(tiny_model_dir, tmp_path / "out", chat_template=str(template))
    assert str(e.value) == f"base.chat_template: {template} cannot render a user turn and the assistant's cue: no prompts here"
