"""bench.rm_heldout refuses bad input before any model loads."""

from __future__ import annotations

import pytest

from bench import rm_heldout


def test_a_folder_that_is_not_a_finished_rm_stage_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        rm_heldout.main(["--rm", str(tmp_path), "--data", "configs/data/demo_rm_k8.jsonl"])
    assert stopped.value.code == 2
    assert f"--rm {tmp_path}: not a finished stage folder" in capsys.readouterr().err


def test_a_missing_rankings_file_is_named_in_one_line(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit) as stopped:
        rm_heldout.main(["--rm", str(tmp_path), "--data", str(tmp_path / "nope.jsonl")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "rm.data.train" in error and "nope.jsonl" in error
