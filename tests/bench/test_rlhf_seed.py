"""bench.rlhf_seed refuses bad input before anything loads or trains."""

from __future__ import annotations

import pytest

from bench import rlhf_seed


@pytest.fixture
def stages(tmp_path):
    """A run with finished base and sft folders, and a finished rm: manifests only."""
    for name in ("run/base", "run/sft", "rm"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "manifest.json").write_text("{}")
    return tmp_path


def call(stages, *extra):
    return rlhf_seed.main(["--rm", str(stages / "rm"), "--seed", "1", "--out", str(stages / "out"), "--run", str(stages / "run"), *extra])


@pytest.mark.parametrize(
    "sets, named",
    [
        (["rlhf.ptx_coeff=1"], "rlhf.ptx_coeff: unknown setting"),
        (["rlhf.ptx_coef=1"], "needs data.ptx"),
        (["rlhf.steps=many"], "rlhf.steps"),
    ],
)
def test_a_bad_set_stops_with_one_line_before_rlhf_starts(stages, capsys, sets, named):
    with pytest.raises(SystemExit) as stopped:
        call(stages, *[arg for s in sets for arg in ("--set", s)])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert named in error
    assert not (stages / "out").exists()


def test_a_folder_that_is_not_a_finished_stage_is_refused(stages, capsys):
    (stages / "rm" / "manifest.json").unlink()
    with pytest.raises(SystemExit) as stopped:
        call(stages)
    assert stopped.value.code == 2
    assert "rm: not a finished stage folder" in capsys.readouterr().err
