"""What the runner prints: durations and the run summary (status is tested with the runner)."""

from __future__ import annotations

from pipeline import summary


def test_duration_reads_minutes_and_seconds_and_says_when_none_was_recorded():
    assert summary.duration(185) == "3m05s"
    assert summary.duration(59.96) == "1m00s", "rounded once, so 59.96 s is not '0m60s'"
    assert summary.duration(12.34) == "12.3s"
    assert summary.duration(None) == "?" and summary.duration("3") == "?"


def test_the_summary_has_one_line_per_stage_with_its_time_only_when_built():
    text = summary.format_summary([
        {"stage": "sft", "action": "built", "seconds": 142.0, "headline": "loss 1.99 -> 0.93", "folder": "runs/x/sft"},
        {"stage": "base", "action": "reused", "headline": "134.5M parameters", "folder": "runs/x/base"},
    ])
    lines = text.splitlines()
    assert lines[0] == "[pipeline] summary:" and len(lines) == 3
    assert lines[1].split() == ["sft", "built", "2m22s", "loss", "1.99", "->", "0.93", "(runs/x/sft)"]
    assert lines[2].split() == ["base", "reused", "134.5M", "parameters", "(runs/x/base)"]


def test_status_shows_a_folder_whose_metrics_an_older_version_wrote(tmp_path):
    import json

    from pipeline.stage import Stage
    from tests.pipeline.test_optional_stages import Settings, build, runner

    stages = (Stage("a", Settings, (), lambda cfg: None, build, lambda metrics: f"x is {metrics['x']}"),)
    runner(tmp_path, "", stages=stages).run("a")
    manifest = tmp_path / "runs" / "t" / "a" / "manifest.json"
    assert "x is 0" in runner(tmp_path, "", stages=stages).status()
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "metrics": {"steps": 3}}))
    text = runner(tmp_path, "", stages=stages).status()
    assert "a      complete       (its manifest's metrics lack what this version shows: KeyError('x'))" in text
    assert runner(tmp_path, "", stages=stages).run("a")[0]["action"] == "reused"
