"""The evaluation stage and the end-to-end default on a tiny model: every stage, the
report and its plot exist and load; summaries and win rates on hand-made samples;
judges named wrongly are refused; `python -m pipeline generate` answers and chats."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import yaml

from demo import prompts as demo_prompts
from demo.judge import gold_parts, gold_score
from pipeline import checkpoint as ckpt
from pipeline import cli, generate
from pipeline.config import ConfigError, SettingError
from stages import evaluation
from stages.shared.judge import load_judge, probe_judge
from tests.conftest import ROOT, TINY_RM, crash_when_promoting, tiny_config, write_jsonl

JUDGE = "demo.judge:gold_score"
RM_FILE = ROOT / "configs" / "data" / "demo_rm.jsonl"


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, policy_dir, sft_rows, tmp_path_factory):
    """The shipped default's shape (demo data, demo judge, every stage) on the tiny
    model with a shrunken config; returns (config path, run folder)."""
    tmp = tmp_path_factory.mktemp("e2e")
    sets = demo_prompts.split_prompts(0, {"rank": 0, "rl": 24, "eval": 6})
    rl = write_jsonl(tmp / "rl.jsonl", sets["rl"])
    held = write_jsonl(tmp / "eval.jsonl", sets["eval"])
    rankings = write_jsonl(tmp / "rm.jsonl", [json.loads(line) for line in RM_FILE.read_text().splitlines()][:40])
    train = write_jsonl(tmp / "sft.jsonl", sft_rows[:24])
    path = tiny_config(
        tmp, tiny_model_dir, train, sft={"max_steps": 2},
        rm={**TINY_RM, "data": {"train": str(rankings)}, "max_steps": 3, "batch_size": 4, "criteria": "demo.judge:gold_parts"},
        rlhf={"data": {"prompts": str(rl), "eval_prompts": str(held)}, "method": "lora", "value_model": "reward", "value_layers": 1, "steps": 2, "batch_size": 4, "minibatch_size": 2,
              "microbatch_size": 2, "ppo_epochs": 1, "max_new_tokens": 6, "save_steps": 1,
              "rewards": [{"source": "rm"}, {"source": "demo.rewards:gold", "role": "audit", "name": "gold"}]},
        dpo={"data": {"train": str(rankings)}, "max_steps": 2, "batch_size": 4, "max_length": 96, "save_steps": 10, "logging_steps": 1},
        eval={"prompts": str(held), "judge": JUDGE, "criteria": "demo.judge:gold_parts", "max_new_tokens": 6, "num_samples": 2,
              "compare_with": [{"name": "other", "path": str(policy_dir)}]},
    )
    assert cli.main(["run", "--config", str(path)]) == 0
    return path, tmp / "runs" / "tiny"


def test_the_whole_default_runs_on_a_tiny_model_and_leaves_a_report(tiny_run, policy_dir):
    from matplotlib.image import imread
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _, run = tiny_run
    for stage in ("base", "sft", "rm", "rlhf", "dpo", "eval"):
        assert ckpt.is_complete(run / stage), stage
    for stage in ("base", "sft", "rlhf", "dpo"):
        AutoModelForCausalLM.from_pretrained(run / stage)
    for folder in ("rm", "rlhf/value"):
        AutoModelForSequenceClassification.from_pretrained(run / folder)

    history = [json.loads(line) for line in (run / "rlhf" / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(row["reward/gold"], float) for row in history), "the gold audit source is logged on every PPO step"
    image = imread(run / "eval" / "ppo_curves.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 400

    result = json.loads((run / "eval" / "report.json").read_text())
    metrics = result["metrics"]
    samples = [json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(set(s) == {"prompt", "base", "sft", "rlhf", "dpo", "other"} for s in samples)
    assert set(metrics["policies"]) == {"base", "sft", "rlhf", "dpo", "other"}, "the run's four policies, and a compare_with policy evaluated like them"
    assert set(metrics["win_rates"]) == {"rlhf", "dpo", "other"}

    def mean(values):
        return sum(values) / len(values)

    # Every figure is the summary of the answers written beside it, and every gold score the judge's.
    for name, m in metrics["policies"].items():
        rows = [s[name] for s in samples]
        assert all(r["gold"] == gold_score(s["prompt"], r["response"]) for s, r in zip(samples, rows, strict=True)), name
        assert m["gold_score"] == pytest.approx(mean([r["gold"] for r in rows]))
        assert m["rm_score"] == pytest.approx(mean([r["rm_score"] for r in rows]))
        assert m["kl_from_sft"] == pytest.approx(mean([r["kl_from_sft"] for r in rows]))
        assert m["length"] == pytest.approx(mean([r["length"] for r in rows])) and all(1 <= r["length"] <= 6 for r in rows)
        assert m["eos_fraction"] == pytest.approx(mean([float(r["ended"]) for r in rows]))
        parts = [gold_parts(s["prompt"], r["response"]) for s, r in zip(samples, rows, strict=True)]
        assert metrics["criteria"][name]["correct"] == pytest.approx(mean([float(p["correct"]) for p in parts])), "the correctness share"
    wins = [1.0 if s["rlhf"]["gold"] > s["sft"]["gold"] else 0.5 if s["rlhf"]["gold"] == s["sft"]["gold"] else 0.0 for s in samples]
    assert metrics["win_rate_gold"] == pytest.approx(mean(wins)) == pytest.approx(metrics["win_rates"]["rlhf"]["gold"])
    other_wins = [1.0 if s["other"]["rm_score"] > s["sft"]["rm_score"] else 0.5 if s["other"]["rm_score"] == s["sft"]["rm_score"] else 0.0 for s in samples]
    assert metrics["win_rates"]["other"]["rm"] == pytest.approx(mean(other_wins))
    dpo_wins = [1.0 if s["dpo"]["gold"] > s["sft"]["gold"] else 0.5 if s["dpo"]["gold"] == s["sft"]["gold"] else 0.0 for s in samples]
    assert metrics["win_rates"]["dpo"]["gold"] == pytest.approx(mean(dpo_wins))
    assert metrics["compared"]["other"]["path"] == str(policy_dir)
    # SFT is loaded apart from the reference: its KL is measured through the same path as the others'.
    assert metrics["policies"]["sft"]["kl_from_sft"] == pytest.approx(0.0, abs=1e-4), "SFT's KL from its own copy"
    assert max(abs(s["base"]["kl_from_sft"]) for s in samples) > 1e-3, "the model SFT started from is measured as another model"
    assert max(abs(s["sft"]["kl_from_sft"]) for s in samples) < 1e-4
    assert len(result["examples"]) == 2

    rm_eval = json.loads((run / "rm" / "eval.json").read_text())["after"]
    by_criterion = rm_eval["accuracy_by_criterion"]
    assert sum(row["pairs"] for row in by_criterion.values()) == rm_eval["pairs"], "every held-out pair is counted once"
    assert set(by_criterion) <= {"correct", "warm_opening", "warm_closing", "extra_words", "several"}, by_criterion
    assert metrics["reward_model"]["accuracy_by_criterion"] == by_criterion
    report = (run / "eval" / "report.md").read_text()
    assert "## Reward model" in report and "| pairs that differ only in | pairs | accuracy |" in report
    assert "| rlhf | this run |" in report and "| dpo | this run |" in report and "Win rate over SFT" in report and "![PPO curves](ppo_curves.png)" in report
    assert "![score against KL](score_vs_kl.png)" in report
    scatter = imread(run / "eval" / "score_vs_kl.png")
    assert scatter.ndim == 3 and scatter.shape[1] > 600, "two panels: RM score and gold score against KL"
    assert "| other |" in report and "## What the answers do (judge criteria)" in report and "| policy | correct | warm_opening |" in report
    eval_build = json.loads((run / "eval" / "manifest.json").read_text())["build_id"]
    for policy in ("sft", "rlhf", "dpo"):
        card = (run / policy / "README.md").read_text()
        assert card.startswith("---\n") and f"eval build `{eval_build}`" in card, f"{policy}'s card carries the eval's figures"
        assert json.loads((run / policy / "manifest.json").read_text())["build_id"] in card
    rm_card = (run / "rm" / "README.md").read_text()
    assert "# `rm` reward model" in rm_card and "pipeline_tag: text-classification" in rm_card, "the RM's card replaces the Trainer's"
    top = (run / "report.md").read_text()
    assert "![PPO curves](eval/ppo_curves.png)" in top and "](eval/score_vs_kl.png)" in top, "the run-level copy links into eval/"


def test_eval_is_reused_when_nothing_changed(tiny_run, capsys):
    path, run = tiny_run
    before = (run / "eval" / "manifest.json").read_text()
    assert cli.main(["run", "eval", "--config", str(path)]) == 0
    assert (run / "eval" / "manifest.json").read_text() == before
    assert "eval: up to date" in capsys.readouterr().out


def test_the_top_level_report_is_written_only_once_the_eval_folder_is_in_place(tiny_run, monkeypatch):
    path, run = tiny_run
    (run / "report.md").unlink()
    promote = crash_when_promoting(monkeypatch, "eval")
    with pytest.raises(OSError):
        cli.main(["run", "eval", "--config", str(path), "--force"])
    assert not (run / "report.md").exists(), "no copy of a report whose stage did not finish"
    monkeypatch.setattr(ckpt, "promote", promote)
    assert cli.main(["run", "eval", "--config", str(path)]) == 0  # resumed from its partial folder
    assert (run / "report.md").read_text() == evaluation.report.relink((run / "eval" / "report.md").read_text(), "eval")


def test_summary_means_and_win_rates_by_hand():
    def row(rm, gold, kl=0.0, length=4, ended=True):
        return {"rm_score": rm, "gold": gold, "kl_from_sft": kl, "length": length, "ended": ended}

    samples = {
        "base": [row(0.0, 0.0), row(0.0, None)],
        "sft": [row(1.0, 1.0), row(0.5, 1.5, length=8, ended=False)],
        "rlhf": [row(2.0, 1.0, kl=0.4), row(0.0, 2.0, kl=0.2)],
    }
    out = evaluation.summarize(samples, has_judge=True)
    assert out["policies"]["sft"] == {"rm_score": 0.75, "gold_score": 1.25, "kl_from_sft": 0.0, "length": 6.0, "eos_fraction": 0.5}
    assert out["policies"]["base"]["gold_score"] == 0.0, "a prompt the judge cannot rate is left out"
    assert out["policies"]["rlhf"]["kl_from_sft"] == pytest.approx(0.3)
    assert out["win_rate_rm"] == 0.5  # one win, one loss
    assert out["win_rate_gold"] == 0.75  # a tie (half) and a win
    assert evaluation.summarize(samples, has_judge=False)["win_rate_gold"] is None


@pytest.mark.parametrize(
    "spec, message",
    [
        ("demo.judge", "eval.judge: expected module:function"),
        ("no_such_module:score", "eval.judge: cannot import 'no_such_module'"),
        ("demo.judge:nothing", "eval.judge: 'demo.judge' has no function 'nothing'"),
        ("pipeline.demo_judge:gold_score", "eval.judge: pipeline.demo_judge moved to demo.judge; write demo.judge:gold_score"),
    ],
)
def test_a_judge_named_wrongly_is_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_judge(spec, "eval.judge")


def raises(prompt, response):
    raise KeyError(prompt)


def exits(prompt, response):
    raise SystemExit(5)


def says_nan(prompt, response):
    return float("nan")


def says_text(prompt, response):
    return "good"


def takes_one(response):
    return 1.0


def parts_as_list(prompt, response):
    return [1, 0]


def nan_only_when_answered(prompt, response):
    return float("nan") if response else 1.0


@pytest.mark.parametrize("spec, parts, message", [
    ("raises", False, "eval.judge: tests.stages.test_eval:raises raised KeyError('What is 2+2?') on prompt 'What is 2+2?' (response '')"),
    ("exits", False, "eval.judge: tests.stages.test_eval:exits raised SystemExit(5) on prompt 'What is 2+2?' (response '')"),
    ("says_nan", False, "eval.judge: tests.stages.test_eval:says_nan returned nan, not a finite number or None, on prompt 'What is 2+2?' (response '')"),
    ("says_text", False, "eval.judge: tests.stages.test_eval:says_text returned a str, not a finite number or None, on prompt"),
    ("takes_one", False, "eval.judge: tests.stages.test_eval:takes_one(response) cannot be called as takes_one(prompt: str, response: str)"),
    ("parts_as_list", True, "eval.judge: tests.stages.test_eval:parts_as_list returned a list, not a dict of names to numbers or bools, or None, on prompt"),
    ("nan_only_when_answered", False, "returned nan, not a finite number or None, on prompt 'What is 2+2?' (response 'The answer is 4.')"),
])
def test_a_judge_that_cannot_rate_is_refused_by_its_probe(spec, parts, message):
    with pytest.raises(ConfigError) as caught:
        probe_judge(f"tests.stages.test_eval:{spec}", "eval.judge", [], parts=parts)
    assert message in str(caught.value)
    assert probe_judge("demo.judge:gold_parts", "eval.criteria", ["What is 2+2?"], parts=True) is None  # the demo's pass


@pytest.mark.parametrize("section, settings, message", [
    ("eval", {"judge": "tests.stages.test_eval:says_nan"}, "eval.judge: tests.stages.test_eval:says_nan returned nan"),
    ("rm", {"criteria": "tests.stages.test_eval:raises"}, "rm.criteria: tests.stages.test_eval:raises raised KeyError"),
    ("rm", {"criteria": "demo.judge:missing"}, "rm.criteria: 'demo.judge' has no function 'missing'"),
    ("rlhf", {"rewards": [{"source": "rm"}, {"source": "demo.rewards:missing", "role": "audit"}]}, "rlhf.rewards[1].source: 'demo.rewards' has no function 'missing'"),
    ("rlhf", {"judge": "demo.judge:gold_score"}, "rlhf.judge: is now an audit reward source: rewards: [{source: rm}, {source: demo.rewards:gold, role: audit, name: gold}]"),
])
def test_a_bad_judge_stops_the_run_before_training(tiny_model_dir, sft_rows, tmp_path, capsys, section, settings, message):
    train = write_jsonl(tmp_path / "sft.jsonl", sft_rows[:8])
    path = tiny_config(tmp_path, tiny_model_dir, train, **{section: settings})
    assert cli.main(["run", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs" / "tiny" / "base").exists(), "nothing was built"


def test_generate_answers_a_prompt_and_chats(tiny_run, capsys):
    path, _ = tiny_run
    assert cli.main(["generate", "sft", "--config", str(path), "--prompt", "What is 2 + 2?", "--max-new-tokens", "4", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip()
    args = cli.parser().parse_args(["generate", "rlhf", "--config", str(path), "--greedy", "--max-new-tokens", "4"])
    out = io.StringIO()
    run_dir = tiny_run[1]
    assert generate.main(args, run_dir, stdin=io.StringIO("Hello\n/reset\nWhat is 3 + 4?\n\nnot read\n"), stdout=out) == 0
    replies = [line for line in out.getvalue().splitlines() if line.startswith("> ")]
    assert len(replies) == 2, out.getvalue()


@pytest.mark.parametrize("target, message", [("rm", "not a policy"), ("nowhere", "not a stage of this run")])
def test_generate_refuses_what_is_not_a_policy(tiny_run, capsys, target, message):
    path, run = tiny_run
    checkpoint = str(run / "rm") if target == "rm" else target
    assert cli.main(["generate", checkpoint, "--config", str(path), "--prompt", "hi"]) == 2
    assert message in capsys.readouterr().err


def test_generate_names_a_stage_that_is_not_built(tmp_path, tiny_model_dir, sft_rows, capsys):
    path = tiny_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "sft.jsonl", sft_rows[:8]))
    assert cli.main(["generate", "rlhf", "--config", str(path), "--prompt", "hi"]) == 2
    assert "no complete rlhf checkpoint" in capsys.readouterr().err


def test_default_config_wires_the_demo_judge():
    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert config["eval"]["judge"] == JUDGE
    assert config["rlhf"]["rewards"] == [{"source": "rm"}, {"source": "demo.rewards:gold", "role": "audit", "name": "gold"}], "the judge is watched, never trained on"
    assert config["eval"]["prompts"] == "configs/data/demo_eval.jsonl"


def test_eval_without_a_judge_reports_what_it_can(tiny_run, tmp_path):
    # On a copy of the run, so the shared one stays as the other tests expect, in any order.
    path, shared = tiny_run
    run = tmp_path / "runs" / shared.name
    shutil.copytree(shared, run)
    assert cli.main(["run", "eval", "--config", str(path), "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "eval.judge=null"]) == 0
    for stage in ("base", "sft", "rm", "rlhf"):
        assert (run / stage / "manifest.json").read_text() == (shared / stage / "manifest.json").read_text(), f"{stage} was reused"
    metrics = json.loads((run / "eval" / "report.json").read_text())["metrics"]
    assert metrics["judge"] is None and metrics["win_rate_gold"] is None
    assert all(m["gold_score"] is None and m["rm_score"] is not None for m in metrics["policies"].values())
    report = (run / "eval" / "report.md").read_text()
    assert "No gold judge is configured." in report and "by gold judge" not in report


def test_several_answers_per_prompt_are_sampled_scored_and_paired_with_sfts(tiny_run, tmp_path):
    path, shared = tiny_run
    run = tmp_path / "runs" / shared.name
    shutil.copytree(shared, run)
    assert cli.main(["run", "eval", "--config", str(path), "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "eval.samples_per_prompt=3"]) == 0
    metrics = json.loads((run / "eval" / "report.json").read_text())["metrics"]
    samples = [json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    held = [json.loads(line)["prompt"] for line in (shared.parent.parent / "eval.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == [p for p in held for _ in range(3)], "each prompt's three answers side by side"
    assert metrics["prompts"] == 6 and metrics["samples_per_prompt"] == 3
    assert any(len({s["sft"]["response"] for s in samples[i : i + 3]}) > 1 for i in range(0, 18, 3)), "answers are sampled, not copied"
    wins = [1.0 if s["rlhf"]["gold"] > s["sft"]["gold"] else 0.5 if s["rlhf"]["gold"] == s["sft"]["gold"] else 0.0 for s in samples]
    assert metrics["win_rate_gold"] == pytest.approx(sum(wins) / 18)
    assert metrics["policies"]["sft"]["gold_score"] == pytest.approx(sum(s["sft"]["gold"] for s in samples) / 18)
    assert "6 held-out prompts" in (run / "eval" / "report.md").read_text() and "3 responses each" in (run / "eval" / "report.md").read_text()
    assert "3 sampled answers each" in (run / "rlhf" / "README.md").read_text()
    with pytest.raises(SettingError, match="must be at least 1"):
        evaluation.EvalConfig(samples_per_prompt=0)
