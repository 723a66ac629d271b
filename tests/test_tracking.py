"""How quill.stages.tracking names a stage's tracker run (no tracker needed): the run's name from the runner, the
stage as the run, tensorboard events beside the stages; a name the config sets wins; report_to none changes nothing."""

import os
from types import SimpleNamespace

import pytest

from quill.stages.tracking import DEFAULT_PROJECT, RUN_NAME_ENV, configure_tracking


def args(report_to, **kw):
    return SimpleNamespace(report_to=report_to, project=DEFAULT_PROJECT, run_name=None, **kw)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    # configure_tracking sets TENSORBOARD_LOGGING_DIR in this process. monkeypatch only restores a variable it saw,
    # so set each one before deleting it: otherwise the folder leaks into later tests' stage processes on this worker.
    for name in (RUN_NAME_ENV, "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_stages_of_a_run_share_the_project_and_are_named_by_their_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(RUN_NAME_ENV, "tiny-20260101-000000")
    a = args(["tensorboard", "trackio"])
    configure_tracking(a, tmp_path / "midtrain")
    assert (a.project, a.run_name) == ("tiny-20260101-000000", "midtrain")
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tensorboard" / "tiny-20260101-000000" / "midtrain")


def test_config_names_win_and_a_lone_stage_is_its_own_run(tmp_path):
    a = args("trackio")
    a.project, a.run_name = "mine", "first-try"
    configure_tracking(a, tmp_path / "sft")
    assert (a.project, a.run_name) == ("mine", "first-try")
    lone = args("trackio")
    configure_tracking(lone, tmp_path / "sft")
    assert lone.project.startswith("sft-") and lone.run_name == "sft"
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # only tensorboard needs a folder


@pytest.mark.parametrize("report_to", ["none", ["none"], [], None])
def test_no_tracker_changes_nothing(tmp_path, report_to):
    a = args(report_to)
    configure_tracking(a, tmp_path / "sft")
    assert (a.project, a.run_name) == (DEFAULT_PROJECT, None) and "TENSORBOARD_LOGGING_DIR" not in os.environ
