"""What the runner does around a stage's work folder: `publish` (the eval report's copy at
the top of the run) runs only once the folder is in place, so the copy never shows a
report whose stage did not finish; an interrupted run it cannot resume is discarded,
saying why."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline import checkpoint as ckpt
from tests.conftest import crash_when_promoting
from tests.pipeline.test_optional_stages import runner, stage


def published(folder):
    (folder.parent / "published.txt").write_text((folder / "manifest.json").read_text())


PUBLISHING = (stage("a", ()), dataclasses.replace(stage("b", ("a",)), publish=published))


def test_publish_runs_after_the_folder_is_promoted(tmp_path):
    runner(tmp_path, "", stages=PUBLISHING).run("b")
    run = tmp_path / "runs" / "t"
    assert (run / "published.txt").read_text() == (run / "b" / "manifest.json").read_text(), "it saw the promoted folder"


def test_a_crash_before_promotion_publishes_nothing(tmp_path, monkeypatch):
    crash_when_promoting(monkeypatch, "b")
    with pytest.raises(OSError):
        runner(tmp_path, "", stages=PUBLISHING).run("b")
    assert not (tmp_path / "runs" / "t" / "published.txt").exists()


@pytest.mark.parametrize("manifest, why", [("{not json", "whose manifest cannot be read"), (None, "made with another config")])
def test_an_interrupted_run_that_cannot_resume_is_discarded_saying_why(tmp_path, manifest, why):
    import json

    from pipeline import config as configuration
    from pipeline.runner import Runner

    runner(tmp_path, "", stages=PUBLISHING).run("b")
    partial = ckpt.partial_dir(tmp_path / "runs" / "t", "b")
    partial.mkdir()
    other = {"status": "running", "fingerprint": "another", "timings": {"attempts": 1, "started": "then"}}
    (partial / "manifest.json").write_text(manifest or json.dumps(other))
    path = tmp_path / "run.yaml"
    logged = []
    Runner(configuration.load(path, [], {s.name: s.config for s in PUBLISHING}), PUBLISHING, log=logged.append).run("b", force=True)
    assert f"[pipeline] b: discarding an interrupted run {why}" in logged
