"""The rlhf stage's reward sources (`stages.rlhf_rewards`): the spec as the config
loader builds it, and every source `check_rewards` refuses before training, with its
exact one-line message. The callables probed live in this module."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from pipeline.config import build
from pipeline.errors import ConfigError
from stages.rlhf_rewards import DEFAULT_PROBE, RewardSpec, check_rewards, kind
from tests.conftest import ROOT

HERE = "tests.stages.test_rlhf_rewards"
PROMPTS = [json.loads(line)["prompt"] for line in (ROOT / "configs/data/demo_eval.jsonl").read_text().splitlines()][2:8]
FIRST = PROMPTS[0]
BACKWARDS = next(p for p in PROMPTS[:4] if "backwards" in p)
NOT_CALLABLE = 3
calls: list[int] = []


def none_and_bools(prompts, completions):
    calls.append(len(prompts))
    return [None if i % 2 else bool(c) for i, c in enumerate(completions)]


def zero():
    return []


def one(prompts):
    return [1.0] * len(prompts)


def three(prompts, completions, extra):
    return [1.0] * len(prompts)


def per_pair_length(prompt, response):
    return float(len(response))


def two_ratings(prompts, completions):
    return [1.0, 1.0]


def whole_string(prompts, completions):
    return "0.5"


def strings(prompts, completions):
    return ["good"] * len(prompts)


def nan_on_answers(prompts, completions):
    return [math.nan if c else 0.0 for c in completions]


def inf(prompts, completions):
    return [math.inf] * len(prompts)


def exits(prompts, completions):
    raise SystemExit(5)


def boom(prompts, completions):
    if any("backwards" in p for p in prompts):
        raise ValueError("x")
    return [0.0] * len(prompts)


def source(name):
    return RewardSpec(f"{HERE}:{name}")


def refused(specs, prompts=PROMPTS) -> str:
    with pytest.raises(ConfigError) as caught:
        check_rewards(tuple(specs), "rlhf.rewards", prompts)
    return str(caught.value)


def batch_signature(name, args):
    return f"rlhf.rewards[1]: {HERE}:{name}({args}) cannot be called as fn(prompts: list[str], completions: list[str]) -> list[float | None]"


@pytest.mark.parametrize(("value", "message"), [
    ("no_such_mod:score", "rlhf.rewards[1].source: cannot import 'no_such_mod': No module named 'no_such_mod'"),
    ("demo.rewards:nothing", "rlhf.rewards[1].source: 'demo.rewards' has no function 'nothing'"),
    ("demo.rewards:", "rlhf.rewards[1].source: expected module:function, got 'demo.rewards:'"),
    (f"{HERE}:NOT_CALLABLE", f"rlhf.rewards[1].source: {HERE}:NOT_CALLABLE is not callable (type int)"),
    (f"{HERE}:zero", batch_signature("zero", "")),
    (f"{HERE}:one", batch_signature("one", "prompts")),
    (f"{HERE}:three", batch_signature("three", "prompts, completions, extra")),
    ("demo.judge:gold_score", "rlhf.rewards[1]: demo.judge:gold_score rates one (prompt, response) pair at a time, like a judge; a reward source rates a batch: fn(prompts: list[str], completions: list[str]) -> list[float | None]"),
    (f"{HERE}:per_pair_length", f"rlhf.rewards[1]: {HERE}:per_pair_length rates one (prompt, response) pair at a time, like a judge; a reward source rates a batch: fn(prompts: list[str], completions: list[str]) -> list[float | None]"),
    (f"{HERE}:two_ratings", f"rlhf.rewards[1]: {HERE}:two_ratings returned 2 ratings for 4 completions"),
    (f"{HERE}:whole_string", f"rlhf.rewards[1]: {HERE}:whole_string returned '0.5' (a str), not a list of 4 ratings"),
    (f"{HERE}:strings", f"rlhf.rewards[1]: {HERE}:strings returned 'good' (a str), not a number or None on the probe prompt {FIRST!r}"),
    (f"{HERE}:nan_on_answers", f"rlhf.rewards[1]: {HERE}:nan_on_answers returned nan, not a finite number (None says it cannot rate one) on the probe prompt {FIRST!r} (completion 'The answer is 4.')"),
    (f"{HERE}:inf", f"rlhf.rewards[1]: {HERE}:inf returned inf, not a finite number (None says it cannot rate one) on the probe prompt {FIRST!r}"),
    (f"{HERE}:boom", f"rlhf.rewards[1]: {HERE}:boom raised ValueError('x') on the probe prompt {BACKWARDS!r}"),
    (f"{HERE}:exits", f"rlhf.rewards[1]: {HERE}:exits raised SystemExit(5) on the probe prompt {FIRST!r}"),
])
def test_a_bad_callable_is_refused_with_its_line(value, message):
    assert refused([RewardSpec("rm"), RewardSpec(value)]) == message


def test_a_module_that_fails_to_import_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "broken_reward_mod.py").write_text("raise RuntimeError('half written')\n")
    (tmp_path / "exiting_reward_mod.py").write_text("import sys\nsys.exit(3)\n")  # 3 would read as "diverged"
    monkeypatch.syspath_prepend(str(tmp_path))
    assert refused([RewardSpec("rm"), RewardSpec("broken_reward_mod:score")]) == "rlhf.rewards[1].source: importing 'broken_reward_mod' raised RuntimeError('half written')"
    assert refused([RewardSpec("rm"), RewardSpec("exiting_reward_mod:score")]) == "rlhf.rewards[1].source: importing 'exiting_reward_mod' raised SystemExit(3)"


def test_a_set_of_sources_needs_one_to_train_on_and_distinct_names(tmp_path):
    assert refused([RewardSpec("demo.rewards:gold", role="audit")]) == "rlhf.rewards: no source has role train; at least one must make the reward"
    assert refused([]) == "rlhf.rewards: no source has role train; at least one must make the reward"
    twice = [RewardSpec("rm"), RewardSpec("demo.rewards:correct"), RewardSpec("demo.rewards:correct", role="audit")]
    assert refused(twice) == "rlhf.rewards[2].name: 'correct' is also the name of rlhf.rewards[1]; set name: to tell them apart"
    check_rewards((*twice[:2], dataclasses.replace(twice[2], name="correct_audit")), "rlhf.rewards", PROMPTS)


def test_a_reward_model_folder_must_exist_and_hold_a_model(tmp_path):
    missing = tmp_path / "no_rm"
    assert refused([RewardSpec(str(missing))]) == f"rlhf.rewards[0].source: no such folder: {missing} (a callable is written module:function)"
    assert refused([RewardSpec("my_rm")]) == "rlhf.rewards[0].source: no such folder: my_rm (a callable is written module:function)"
    (tmp_path / "empty").mkdir()
    assert refused([RewardSpec(str(tmp_path / "empty"))]) == f"rlhf.rewards[0].source: {tmp_path / 'empty'} is not a model folder (no config.json)"


def test_good_sources_pass_and_none_and_bools_are_ratings(tmp_path):
    folder = tmp_path / "other_rm"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForSequenceClassification"]}')
    (folder / "model.safetensors").write_bytes(b"")
    calls.clear()
    specs = (RewardSpec("rm"), RewardSpec(str(folder), weight=0.5), source("none_and_bools"), RewardSpec("demo.rewards:correct"), RewardSpec("demo.rewards:gold", role="audit"))
    check_rewards(specs, "rlhf.rewards", PROMPTS)
    assert calls == [4, 4]  # at most 4 prompts, once with each probe completion
    calls.clear()
    check_rewards(specs, "rlhf.rewards", [])
    assert calls == [1, 1]
    assert DEFAULT_PROBE == "What is 2+2?"


def test_what_each_source_is_and_its_metric_name(tmp_path):
    (tmp_path / "rm_b").mkdir()
    assert [kind(RewardSpec(s)) for s in ("rm", "runs/x/rm", str(tmp_path / "rm_b"), "demo.rewards:gold", "my_rm")] == ["model", "model", "model", "function", "model"]
    names = [RewardSpec(s).metric_name for s in ("rm", "runs/x/rm_a/", str(tmp_path / "rm_b"), "demo.rewards:gold")]
    assert names == ["rm", "rm_a", "rm_b", "gold"]
    assert RewardSpec("rm", name="reward_model").metric_name == "reward_model"


@pytest.mark.parametrize(("settings", "message"), [
    ({}, "rlhf.rewards: missing required setting 'source'"),
    ({"source": ""}, 'rlhf.rewards.source: must name "rm", a model folder or module:function'),
    ({"source": "rm", "weight": math.nan}, "rlhf.rewards.weight: expected a finite number, got nan"),
    ({"source": "rm", "weight": "-inf", "role": "audit"}, "rlhf.rewards.weight: expected a finite number, got -inf"),
    ({"source": "rm", "weight": 0}, "rlhf.rewards.weight: is 0 for a train source; use role: audit to log a source without training on it"),
    ({"source": "rm", "role": "judge"}, "rlhf.rewards.role: expected one of 'train', 'audit', got 'judge'"),
    ({"source": "rm", "name": "my rm"}, "rlhf.rewards.name: must be a non-empty metric name without spaces or '/', got 'my rm'"),
])
def test_the_loader_refuses_a_bad_spec(settings, message):
    with pytest.raises(ConfigError) as caught:
        build(RewardSpec, settings, "rlhf.rewards", lambda key: key)
    assert str(caught.value) == message


def test_the_loader_builds_a_list_of_specs():
    @dataclasses.dataclass(frozen=True)
    class Holder:
        rewards: tuple[RewardSpec, ...] = (RewardSpec("rm"),)

    written = [{"source": "rm"}, {"source": "demo.rewards:correct", "weight": "2e-1"}, {"source": "demo.rewards:gold", "role": "audit", "weight": 0}]
    held = build(Holder, {"rewards": written}, "rlhf", lambda key: key)
    assert held.rewards == (RewardSpec("rm"), RewardSpec("demo.rewards:correct", weight=0.2), RewardSpec("demo.rewards:gold", role="audit", weight=0.0))
    assert build(Holder, {}, "rlhf", lambda key: key).rewards == (RewardSpec("rm"),)


def test_a_bad_item_of_the_list_is_named_with_its_index_and_line(tmp_path):
    from pipeline import config
    from stages import config_classes

    path = tmp_path / "run.yaml"
    path.write_text("rlhf:\n  rewards:\n    - source: rm\n    - source: demo.rewards:correct\n      weight: heavy\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path, [], config_classes())
    assert str(caught.value) == f"{path}:5: rlhf.rewards[1].weight: expected a number, got 'heavy'"
    path.write_text("rlhf:\n  rewards:\n    - source: rm\n    - {source: demo.rewards:gold, role: audit, weight: 0}\n    - source: rm\n      weight: 0\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path, [], config_classes())
    assert str(caught.value).startswith(f"{path}:6: rlhf.rewards[2].weight: is 0 for a train source")


def test_the_guard_must_watch_an_audit_source(tmp_path):
    from stages import rlhf

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "What is {i} + 2?"}}\n' for i in range(20)))
    cfg = rlhf.RlhfConfig(data=rlhf.RlhfData(prompts=str(prompts)), rewards=(RewardSpec("rm"), RewardSpec("demo.rewards:gold", role="audit", name="gold")),
                          guard=rlhf.GuardSettings(audit="gold_score"))
    with pytest.raises(ConfigError) as caught:
        rlhf.check(cfg)
    assert str(caught.value) == "rlhf.guard.audit: 'gold_score' is not an audit reward source (audit sources: ['gold'])"
