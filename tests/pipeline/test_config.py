"""Config validation: every mistake is one line naming the file, line and key, exit 2."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline import cli
from pipeline import config as configuration
from pipeline.config import ConfigError, SettingError, setting
from tests.conftest import ROOT, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def error_of(path: Path, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    message = str(e.value)
    assert "\n" not in message, "errors are one line"
    return message


# Inputs a shipped config names that a checkout does not have: the HH-RLHF data lives outside the
# project, and the base checkpoint is made by `make base`. They are replaced by stand-ins here.
OUTSIDE = {"hh_rm.yaml": {"rm.init_from": "folder", "rm.data.train": "hh.jsonl.gz"}}
# ... and the default run's policy, which demo_grpo.yaml's report compares with.
COMPARED = {"demo_grpo.yaml": "eval.compare_with=[{{name: ppo, path: {folder}}}]"}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path, tmp_path):
    stand_ins = []
    for key, name in OUTSIDE.get(path.name, {}).items():
        (tmp_path / name).mkdir() if name == "folder" else (tmp_path / name).write_text("")
        stand_ins.append(f"{key}={tmp_path / name}")
    if path.name in COMPARED:
        (tmp_path / "policy").mkdir()
        stand_ins.append(COMPARED[path.name].format(folder=tmp_path / "policy"))
    cfg = load_config(path, stand_ins)
    assert set(cfg.stages) >= {"base", "sft"}


def test_defaults_and_values(tmp_path):
    path = write(tmp_path, "run:\n  name: demo\nsft:\n  learning_rate: 1e-5\n  method: lora\n  lora:\n    r: 4\n")
    cfg = load_config(path)
    assert cfg.run_dir == Path("runs/demo")
    sft = cfg.stages["sft"]
    # PyYAML reads 1e-5 as a string; a float setting must still accept it.
    assert sft.learning_rate == 1e-5 and isinstance(sft.learning_rate, float)
    assert sft.method == "lora" and sft.lora.r == 4 and sft.lora.alpha == 32
    assert cfg.stages["base"].dtype == "float32"


def test_unknown_key_names_file_line_and_key(tmp_path):
    path = write(tmp_path, "run:\n  name: demo\nsft:\n  method: full\n  learnin_rate: 0.1\n")
    assert error_of(path).startswith(f"{path}:5: sft.learnin_rate: unknown setting (known: init_from, data, method")


def test_unknown_nested_key(tmp_path):
    path = write(tmp_path, "sft:\n  lora:\n    rank: 8\n")
    assert error_of(path).startswith(f"{path}:3: sft.lora.rank: unknown setting (known: r, alpha")


def test_unknown_section(tmp_path):
    path = write(tmp_path, "sft: {}\nppo:\n  lr: 1\n")
    assert error_of(path) == f"{path}:2: ppo: unknown section (expected one of: run, base, sft, rm, rlhf, dpo, eval)"


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("sft:\n  batch_size: eight\n", ":2: sft.batch_size: expected an integer, got 'eight'"),
        ("sft:\n  batch_size: 2.5\n", ":2: sft.batch_size: expected an integer, got 2.5"),
        ("sft:\n  learning_rate: fast\n", ":2: sft.learning_rate: expected a number, got 'fast'"),
        ("sft:\n  activation_checkpointing: 'yes'\n", ":2: sft.activation_checkpointing: expected true or false, got 'yes'"),
        ("sft:\n  method: qlora\n", ":2: sft.method: expected one of 'full', 'lora', got 'qlora'"),
        ("sft:\n  data: configs/data/demo_sft.jsonl\n", ":2: sft.data: expected a mapping of settings, got 'configs/data/demo_sft.jsonl'"),
        ("run:\n  seed: [1]\n", ":2: run.seed: expected an integer, got a list"),
        # NaN passes every `x <= 0` check, so no float setting takes it (nor infinity)
        ("sft:\n  learning_rate: .nan\n", ":2: sft.learning_rate: expected a finite number, got nan"),
        ("sft:\n  learning_rate: .inf\n", ":2: sft.learning_rate: expected a finite number, got inf"),
        ("rlhf:\n  kl_coef: nan\n", ":2: rlhf.kl_coef: expected a finite number, got nan"),
        ("run:\n  seed: -1\n", ":2: run.seed: must be in [0, 2**32), got -1"),
        ("sft:\n  warmup_ratio: 5\n", ":2: sft.warmup_ratio: must be in [0, 1), a share of the steps, got 5.0"),
        ("rm:\n  max_grad_norm: -1\n", ":2: rm.max_grad_norm: must be >= 0 (0 is off), got -1.0"),
        ("rlhf:\n  clip_range: -1\n", ":2: rlhf.clip_range: must be positive, got -1.0"),
        ("rlhf:\n  lam: -3\n", ":2: rlhf.lam: must be in [0, 1], got -3.0"),
        ("rlhf:\n  score_clip: -1\n", ":2: rlhf.score_clip: must be positive (or null for no clipping), got -1.0"),
        ("rlhf:\n  missing_eos_penalty: -1\n", ":2: rlhf.missing_eos_penalty: must be >= 0, got -1.0"),
        ("eval:\n  top_p: 5\n", ":2: eval.top_p: must be in (0, 1], got 5.0"),
        ("rlhf:\n  rewards: []\n", ":2: rlhf.rewards: no source has role train; at least one must make the reward"),
        # checks inside the config classes
        ("sft:\n  data:\n    eval_fraction: 1.5\n", ":3: sft.data.eval_fraction: must be between 0 and 1, got 1.5"),
        ("sft:\n  batch_size: 0\n", ":2: sft.batch_size: must be at least 1, got 0"),
        ("run:\n  name: ../elsewhere\n", ":2: run.name: must be a plain folder name, got '../elsewhere'"),
        ("rm:\n  max_length: 64\n  max_prompt_length: 64\n", ":3: rm.max_prompt_length: must be between 1 and max_length - 1 (63), got 64"),
        ("sft:\n  method: lora\n  lora:\n    alpha: 0\n", ":4: sft.lora.alpha: must be positive, got 0"),
        # missing files
        ("sft:\n  data:\n    train: data/missing.jsonl\n", ":3: sft.data.train: no such file or folder: data/missing.jsonl"),
        ("base:\n  model: ./no/such/model\n", ":2: base.model: no such file or folder: ./no/such/model"),
        ("base:\n  model: pkg:not_a_package_here/x.gguf\n", ":2: base.model: package 'not_a_package_here' is not installed (needed for pkg:not_a_package_here/x.gguf)"),
    ],
)
def test_one_line_errors_name_file_line_and_key(tmp_path, yaml_text, expected):
    path = write(tmp_path, yaml_text)
    assert error_of(path) == f"{path}{expected}"


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    path = write(tmp_path, f"run:\n  output_dir: {tmp_path / 'runs'}\n")
    assert error_of(path) == f"{path}:2: run.output_dir: {tmp_path / 'runs'} is a file, not a folder"


def test_hub_ids_are_not_mistaken_for_missing_files(tmp_path):
    path = write(tmp_path, "base:\n  model: HuggingFaceTB/SmolLM2-135M-Instruct\nsft:\n  data:\n    train: org/dataset:train\n")
    cfg = load_config(path)
    assert cfg.stages["base"].model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert configuration.resolve_local("org/dataset:train") is None
    assert configuration.resolve_local("data/file.jsonl") == Path("data/file.jsonl")


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "sft:\n  method: full\n  batch_size: [1, 2\n")
    message = error_of(path)
    assert message.startswith(f"{path}:") and "invalid YAML" in message


def test_missing_config_file(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: config file not found"


def test_overrides_apply_and_are_validated(tmp_path):
    path = write(tmp_path, "sft:\n  learning_rate: 1.0e-4\n")
    cfg = load_config(path, ["sft.learning_rate=3e-6", "sft.lora.r=2", "run.name=other"])
    assert cfg.stages["sft"].learning_rate == 3e-6 and cfg.stages["sft"].lora.r == 2
    assert cfg.run.name == "other"
    assert error_of(path, ["sft.lerning_rate=1"]).startswith("--set sft.lerning_rate: unknown setting")
    assert error_of(path, ["sft.batch_size=big"]) == "--set sft.batch_size: expected an integer, got 'big'"
    assert error_of(path, ["sft.learning_rate"]).startswith("--set 'sft.learning_rate': expected KEY=VALUE")
    assert error_of(path, ["sft.learning_rate.x=1"]) == "--set sft.learning_rate.x: sft.learning_rate is not a section"
    assert error_of(path, ["sft.method.x=1"]) == "--set sft.method: expected one of 'full', 'lora', got a dict"


def test_make_style_overrides_are_split():
    assert configuration.parse_overrides("a.b=1 c.d='x y'") == ["a.b=1", "c.d=x y"]


def test_cli_exits_2_with_one_line_and_runs_nothing(tmp_path, capsys):
    path = write(tmp_path, f"run:\n  output_dir: {tmp_path / 'runs'}\nsft:\n  epochs: many\n")
    assert cli.main(["run", "sft", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}:4: sft.epochs: expected a number, got 'many'\n"
    assert not (tmp_path / "runs").exists()


def test_cli_config_prints_resolved_values(tmp_path, capsys):
    path = write(tmp_path, "sft:\n  max_steps: 7\n")
    assert cli.main(["config", "--config", str(path), "--set", "sft.batch_size=3"]) == 0
    out = capsys.readouterr().out
    assert '"max_steps": 7' in out and '"batch_size": 3' in out


def test_required_settings_and_path_kinds():
    @dataclasses.dataclass(frozen=True)
    class Section:
        needed: int = setting()
        file: str | None = setting(None, path="local")

    def locate(key):
        return f"x.yaml: {key}"

    with pytest.raises(ConfigError, match=r"^x.yaml: s: missing required setting 'needed'$"):
        configuration.build(Section, {}, "s", locate)
    with pytest.raises(ConfigError, match=r"^x.yaml: s.file: no such file or folder: org/name$"):
        configuration.build(Section, {"needed": 1, "file": "org/name"}, "s", locate)
    assert configuration.build(Section, {"needed": 1}, "s", locate) == Section(needed=1)


def test_fingerprint_view_skips_volatile_and_unused_settings(tmp_path):
    cfg = load_config(write(tmp_path, "sft:\n  logging_steps: 3\n")).stages["sft"]
    view = configuration.fingerprint_view(cfg, lambda path: "sha256:fixed")
    assert "logging_steps" not in view and "save_steps" not in view and "report_to" not in view
    assert "lora" not in view, "LoRA settings cannot matter for a full fine-tune"
    assert view["data"]["train"] == "sha256:fixed"
    lora = load_config(write(tmp_path, "sft:\n  method: lora\n")).stages["sft"]
    assert configuration.fingerprint_view(lora, lambda path: "h")["lora"]["r"] == 16


def test_setting_error_carries_key():
    error = SettingError("name", "bad")
    assert error.key == "name" and str(error) == "bad"


def test_a_config_extends_another_key_by_key(tmp_path):
    (tmp_path / "base.yaml").write_text("run:\n  name: demo\nsft:\n  learning_rate: 1e-5\n  method: lora\n  lora:\n    r: 4\nrlhf:\n  rewards:\n    - source: rm\n    - source: demo.rewards:gold\n      role: audit\n")
    path = write(tmp_path, "extends: base.yaml\nrun:\n  name: other\nsft:\n  lora:\n    alpha: 8\nrlhf:\n  rewards:\n    - source: rm\n")
    cfg = load_config(path)
    assert cfg.run.name == "other" and cfg.source == str(path)
    sft = cfg.stages["sft"]
    assert sft.learning_rate == 1e-5 and sft.method == "lora" and (sft.lora.r, sft.lora.alpha) == (4, 8), "mappings merge key by key"
    assert [r.source for r in cfg.stages["rlhf"].rewards] == ["rm"], "a list is replaced whole"


def test_a_mistake_in_the_extended_config_names_that_file_and_line(tmp_path):
    (tmp_path / "base.yaml").write_text("sft:\n  method: full\n  learnin_rate: 0.1\n")
    path = write(tmp_path, "# the child\nextends: base.yaml\nsft:\n  method: lora\n")
    assert error_of(path).startswith(f"{tmp_path / 'base.yaml'}:3: sft.learnin_rate: unknown setting")
    (tmp_path / "base.yaml").write_text("sft:\n  method: full\n")
    path = write(tmp_path, "extends: base.yaml\nsft:\n  max_steps: many\n")
    assert error_of(path).startswith(f"{path}:3: sft.max_steps: expected an integer")


@pytest.mark.parametrize("child, base, message", [
    ("extends: nowhere.yaml\n", None, "{path}:1: extends: no such config file: {tmp}/nowhere.yaml"),
    ("extends: [a, b]\n", None, "{path}:1: extends: expected the path of a config file, got a list"),
    ("extends: base.yaml\n", "extends: other.yaml\n", "{tmp}/base.yaml:1: extends: a config that is extended cannot extend another"),
])
def test_extends_refuses_what_it_cannot_follow(tmp_path, child, base, message):
    if base is not None:
        (tmp_path / "base.yaml").write_text(base)
    path = write(tmp_path, child)
    assert error_of(path) == message.format(path=path, tmp=tmp_path)


def test_a_list_given_whole_is_located_where_it_was_given(tmp_path):
    """Items of a list the file wrote are not blamed for a list that --set or a child
    config gave in its place; a null list is refused, not taken for one empty item."""
    (tmp_path / "base.yaml").write_text("rlhf:\n  rewards:\n    - source: rm\n    - {source: demo.rewards:gold, role: audit}\n")
    path = write(tmp_path, "extends: base.yaml\n")
    assert error_of(path, ["rlhf.rewards=[{source: rm, wieght: 2}]"]).startswith("--set rlhf.rewards[0].wieght: unknown setting")
    assert error_of(path, ["rlhf.rewards=[{weight: 2}]"]) == "--set rlhf.rewards[0]: missing required setting 'source'"
    child = write(tmp_path, "extends: base.yaml\nrlhf:\n  rewards:\n    - {source: rm, wieght: 2}\n")
    assert error_of(child).startswith(f"{child}:4: rlhf.rewards[0].wieght: unknown setting")
    child = write(tmp_path, "extends: base.yaml\nrlhf:\n  rewards: null\n")
    assert error_of(child) == f"{child}:3: rlhf.rewards: expected a list, got null"


def test_cli_set_takes_a_value_with_spaces_whole_and_set_many_splits(tmp_path, capsys):
    path = write(tmp_path, "sft:\n  max_steps: 7\n")
    assert cli.main(["config", "--config", str(path), "--set", "rlhf.rewards=[{source: rm, weight: 2}]", "--set-many", "sft.batch_size=3 run.name='my run'"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["rlhf"]["rewards"][0]["weight"] == 2.0 and resolved["sft"]["batch_size"] == 3 and resolved["run"]["name"] == "my run"


def test_make_passes_set_to_the_cli_as_several_overrides(tmp_path):
    import subprocess
    import sys

    path = write(tmp_path, "sft:\n  max_steps: 7\n")
    # PY points make at this interpreter; the install stamp is not asked for (-o)
    done = subprocess.run(["make", "-s", "-o", ".venv/.installed", "config", f"PY={sys.executable}", f"CONFIG={path}", "SET=sft.batch_size=3 run.name='a b'"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    resolved = json.loads(done.stdout)
    assert resolved["sft"]["batch_size"] == 3 and resolved["run"]["name"] == "a b"


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path):
    path = write(tmp_path, "sft:\n  learning_rate: 1.0e-5\n  max_steps: 3\n  learning_rate: 1.0e-3\n")
    assert error_of(path) == f"{path}:4: sft.learning_rate: written twice in one mapping (first on line 2)"
    path = write(tmp_path, "sft:\n  max_steps: 3\nsft:\n  max_steps: 4\n")
    assert error_of(path) == f"{path}:3: sft: written twice in one mapping (first on line 1)"


def test_a_file_gone_since_the_config_loaded_names_its_key_inside_a_list(tmp_path):
    from stages.evaluation import EvalConfig, OtherPolicy

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    cfg = EvalConfig(prompts=str(prompts), compare_with=(OtherPolicy("other", str(tmp_path / "gone")),))
    with pytest.raises(ConfigError) as e:
        configuration.fingerprint_view(cfg, lambda path: "h", "eval")
    assert str(e.value).startswith(f"eval.compare_with[0].path: no such file or folder: {tmp_path / 'gone'} ")
