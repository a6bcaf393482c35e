"""The runner: reuse, staleness and its reasons, --force, init_from, preflight, status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.errors import EXIT_BAD_INPUT, EXIT_DIVERGED, ConfigError, TrainingDiverged
from pipeline.runner import Runner
from stages import STAGES
from tests.conftest import load_config, tiny_config, write_jsonl


def manifest(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "manifest.json").read_text())


def run_cli(*args) -> int:
    return cli.main(list(args))


@pytest.fixture()
def built(tiny_model_dir, sft_rows, tmp_path):
    """A tiny run with base and sft built once."""
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows[:40])
    config = tiny_config(tmp_path, tiny_model_dir, train)
    assert run_cli("run", "sft", "--config", str(config)) == 0
    return config, tmp_path / "runs" / "tiny", train


def status_of(config: Path, *overrides: str) -> str:
    return Runner(load_config(config, overrides), STAGES).status()


def test_up_to_date_stages_are_reused(built, capsys):
    config, run, _ = built
    ids = {stage: manifest(run, stage)["build_id"] for stage in ("base", "sft")}
    capsys.readouterr()
    assert run_cli("run", "sft", "--config", str(config)) == 0
    out = capsys.readouterr().out
    assert "base: up to date, reusing" in out and "sft: up to date, reusing" in out
    assert {stage: manifest(run, stage)["build_id"] for stage in ("base", "sft")} == ids


def test_manifest_records_what_built_the_stage(built):
    _, run, train = built
    sft = manifest(run, "sft")
    assert sft["status"] == "complete" and sft["stage"] == "sft"
    assert sft["parents"]["base"]["build_id"] == manifest(run, "base")["build_id"]
    assert sft["parents"]["base"]["fingerprint"] == manifest(run, "base")["fingerprint"]
    assert sft["data"]["sft.data.train"]["path"] == str(train)
    assert sft["data"]["sft.data.train"]["hash"].startswith("sha256:")
    assert sft["config"]["max_steps"] == 6 and sft["seed"] == 0
    assert {"transformers", "trl", "torch"} <= set(sft["versions"])
    assert sft["timings"]["seconds"] > 0 and sft["timings"]["attempts"] == 1
    assert sft["metrics"]["steps"] == 6
    card = (run / "sft" / "README.md").read_text()
    assert f"Build `{sft['build_id']}`" in card and "The eval stage has not run on this folder yet" in card, "the model card is written from the manifest"


def test_changed_setting_makes_the_stage_and_only_it_stale(built, capsys):
    config, run, _ = built
    text = status_of(config, "sft.learning_rate=5e-4")
    assert "sft    stale" in text and "why: sft.learning_rate: 0.001 -> 0.0005" in text
    assert "base   complete" in text
    base_id = manifest(run, "base")["build_id"]
    capsys.readouterr()
    assert run_cli("run", "sft", "--config", str(config), "--set", "sft.learning_rate=5e-4") == 0
    out = capsys.readouterr().out
    assert "sft: stale, will rerun: sft.learning_rate: 0.001 -> 0.0005" in out
    assert manifest(run, "base")["build_id"] == base_id
    assert manifest(run, "sft")["config"]["learning_rate"] == 5e-4


def test_upstream_change_makes_everything_downstream_stale(built):
    config, _, _ = built
    text = status_of(config, "base.dtype=bfloat16")
    assert "why: base.dtype: 'float32' -> 'bfloat16'" in text
    assert "why: base changed (base.dtype: 'float32' -> 'bfloat16')" in text


def test_settings_that_cannot_change_the_result_keep_checkpoints(built):
    config, _, _ = built
    text = status_of(config, "sft.logging_steps=2", "sft.save_steps=100", "sft.num_samples=1", "sft.report_to=tensorboard")
    assert "stale" not in text


def test_changed_data_content_is_noticed(built):
    config, _, train = built
    train.write_text(train.read_text().replace("Sure!", "Of course!"))
    assert "why: sft.data.train: file content changed" in status_of(config)


def test_force_reruns_the_target_and_stales_its_children(built, capsys):
    config, run, _ = built
    base_id = manifest(run, "base")["build_id"]
    assert run_cli("run", "base", "--config", str(config), "--force") == 0
    assert manifest(run, "base")["build_id"] != base_id
    assert "why: base was rebuilt after sft was made from it" in status_of(config)
    capsys.readouterr()
    assert run_cli("run", "sft", "--config", str(config)) == 0
    assert "base: up to date, reusing" in capsys.readouterr().out
    assert manifest(run, "sft")["parents"]["base"]["build_id"] == manifest(run, "base")["build_id"]


def test_an_up_to_date_stage_does_not_need_its_parent(built, capsys):
    import shutil

    config, run, _ = built
    shutil.rmtree(run / "base")
    assert run_cli("run", "sft", "--config", str(config)) == 0
    assert "sft: up to date, reusing" in capsys.readouterr().out
    assert not (run / "base").exists()


def test_init_from_starts_sft_from_a_users_folder(built, sft_rows, tmp_path, capsys):
    config, run, train = built
    other = tiny_config(tmp_path, run / "base", train, name="from-folder", sft={"init_from": str(run / "base")})
    capsys.readouterr()
    assert run_cli("run", "sft", "--config", str(other)) == 0
    out = capsys.readouterr().out
    assert "base:" not in out.split("summary")[0], "no base stage is built or reused"
    folder = tmp_path / "runs" / "from-folder"
    assert not (folder / "base").exists()
    sft = manifest(folder, "sft")
    assert sft["parents"]["base"]["path"] == str(run / "base")
    assert sft["material"]["inputs"]["base"] == {"init_from": f"checkpoint:{manifest(run, 'base')['fingerprint']}:{manifest(run, 'base')['build_id']}"}


def test_init_from_must_be_a_model_folder(tmp_path, sft_rows, tiny_model_dir, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows[:10])
    (tmp_path / "notamodel").mkdir()
    config = tiny_config(tmp_path, tiny_model_dir, train, sft={"init_from": str(tmp_path / "notamodel")})
    assert run_cli("run", "sft", "--config", str(config)) == 2
    assert capsys.readouterr().err == f"error: sft.init_from: {tmp_path / 'notamodel'} is not a model folder (no config.json)\n"


@pytest.mark.parametrize("folder", ["no weights", "classifier"])
def test_init_from_must_hold_the_weights_of_a_causal_lm(folder, tmp_path, sft_rows, tiny_model_dir, capsys):
    import shutil

    from transformers import AutoModelForSequenceClassification

    given = tmp_path / folder.replace(" ", "-")
    if folder == "no weights":
        shutil.copytree(tiny_model_dir, given)
        (given / "model.safetensors").unlink()
        expected = f"{given} has no weights (model.safetensors, "
    else:
        AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(given)
        expected = f"{given} is a LlamaForSequenceClassification, not a causal language model"
    config = tiny_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "train.jsonl", sft_rows[:10]), sft={"init_from": str(given)})
    assert run_cli("run", "sft", "--config", str(config)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: sft.init_from: {expected}"), errors


def test_bad_data_fails_before_any_stage_runs(tmp_path, tiny_model_dir, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": ""}\n')
    config = tiny_config(tmp_path, tiny_model_dir, train)
    assert run_cli("run", "sft", "--config", str(config)) == 2
    assert capsys.readouterr().err == f"error: {train}:2: 'response' is empty\n"
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == [], "nothing was built or left behind"


def test_bad_input_found_mid_stage_leaves_no_partial_folder(tmp_path, tiny_model_dir, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "word " * 100, "response": "x"}] * 5)
    config = tiny_config(tmp_path, tiny_model_dir, train, sft={"max_length": 16})
    assert run_cli("run", "sft", "--config", str(config)) == 2
    assert "every training row's prompt fills 16 tokens" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == ["base"]


def test_ctrl_c_leaves_a_resumable_partial(built, monkeypatch, capsys):
    import dataclasses

    config, run, _ = built

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "STAGES", tuple(dataclasses.replace(s, run=interrupted) if s.name == "sft" else s for s in STAGES))
    assert run_cli("run", "sft", "--config", str(config), "--set", "sft.max_steps=7") == 130
    assert "sft: interrupted; run the same command again to resume from its start" in capsys.readouterr().out
    text = status_of(config, "sft.max_steps=7")
    assert "a rerun was interrupted before its first checkpoint; the next run resumes it" in text
    assert manifest(run, "sft")["config"]["max_steps"] == 6, "the finished folder is untouched"
    assert "made with another config: the next run starts over" in status_of(config, "sft.max_steps=8")


def test_missing_or_unknown_logger_fails_before_any_stage_runs(tmp_path, tiny_model_dir, sft_rows, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows[:10])
    config = tiny_config(tmp_path, tiny_model_dir, train, sft={"report_to": ["tensorbored"]})
    assert run_cli("run", "sft", "--config", str(config)) == 2
    assert capsys.readouterr().err.startswith("error: sft.report_to: unknown logger 'tensorbored' (known: none, all, azure_ml")
    assert not (tmp_path / "runs" / "tiny" / "base").exists()


def test_status_of_a_fresh_run(tmp_path, tiny_model_dir, sft_rows):
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows[:10])
    text = status_of(tiny_config(tmp_path, tiny_model_dir, train))
    assert "base   missing" in text and "sft    missing" in text


@pytest.mark.parametrize("stages", [["ppo"], ["sft", "ppo"]])
def test_unknown_stage_is_refused_before_anything_runs(tmp_path, capsys, stages):
    config = tmp_path / "run.yaml"
    config.write_text(f"run:\n  output_dir: {tmp_path / 'runs'}\n")
    assert cli.main(["run", *stages, "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith("error: run: unknown stage 'ppo' (stages: base, sft, rm, rlhf, dpo, eval)")
    assert not (tmp_path / "runs").exists()


def test_a_corrupt_manifest_is_rebuilt_and_says_so_once_in_the_log_and_the_new_manifest(built, capsys):
    config, run, _ = built
    (run / "sft" / "manifest.json").write_text('{"stage": "sft", "status": "comp')  # torn by hand or by a disk
    capsys.readouterr()
    assert "manifest.json cannot be read" in status_of(config), "status says why sft is not complete"
    assert run_cli("run", "sft", "--config", str(config)) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "fallback: rebuilt sft:" in line]
    assert len(lines) == 1 and "manifest.json cannot be read" in lines[0], out
    rebuilt = manifest(run, "sft")
    assert rebuilt["status"] == "complete" and len(rebuilt["fallbacks"]) == 1 and rebuilt["fallbacks"][0].startswith("rebuilt sft:")
    assert manifest(run, "base")["fallbacks"] == [], "base took none"


class FakeWorld:
    """Stands in for accelerate's PartialState on two processes, seen from the main one."""

    is_main_process = True

    def __init__(self):
        self.destroyed = 0

    def wait_for_everyone(self):
        pass

    def destroy_process_group(self):
        self.destroyed += 1


@pytest.mark.parametrize("outcome", ["status", "bad input", "diverged"])
def test_the_cli_tears_down_the_process_group_however_the_command_ends(outcome, tiny_model_dir, sft_rows, tmp_path, monkeypatch):
    """Left to interpreter exit, gloo's threads can abort a finished process (SIGABRT,
    "terminate called without an active exception"): a CI run's two-process sft ended so."""
    world = FakeWorld()
    monkeypatch.setattr("pipeline.runner._distributed_state", lambda: world)
    raised = {"bad input": ConfigError("planted"), "diverged": TrainingDiverged("planted")}.get(outcome)

    def fail(self, *args, **kwargs):
        raise raised

    monkeypatch.setattr(Runner, "run", fail)
    config = tiny_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "train.jsonl", sft_rows[:40]))
    code = run_cli("status" if outcome == "status" else "run", "--config", str(config))
    assert code == {"status": 0, "bad input": EXIT_BAD_INPUT, "diverged": EXIT_DIVERGED}[outcome]
    assert world.destroyed == 1
