"""The `quill` console script as users meet it: mistakes are one line on stderr, exit 2, no traceback; --debug
shows the traceback. Recipes use small fake stages (module: in the recipe folder), so no model is trained here.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_outputs import add_fake_stage

from quill.errors import QuillError, run_guarded

QUILL = shutil.which("quill")
needs_quill = pytest.mark.skipif(QUILL is None, reason="the quill console script is not installed (pip install -e .)")


@pytest.fixture
def recipe(tmp_path):
    folder = tmp_path / "rec"
    folder.mkdir()
    add_fake_stage(folder)
    (folder / "a.yaml").write_text("learning_rate: 1.0e-3\n")
    (folder / "recipe.yaml").write_text(
        textwrap.dedent(
            """
            name: fake
            stages:
              - {name: a, module: fake_stage, config: a.yaml}
            """
        )
    )
    return folder


def quill(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    env.pop("QUILL_DEBUG", None)
    return subprocess.run([QUILL, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@needs_quill
def test_unknown_key_in_stage_config(recipe, tmp_path):
    (recipe / "a.yaml").write_text("learning_rat: 1.0e-3\n")
    done = quill("run", str(recipe), "--output-dir", "out", cwd=tmp_path)
    assert_one_line_error(done, "rec/a.yaml line 1", "unknown key 'learning_rat'", "did you mean 'learning_rate'?")
    assert not (tmp_path / "out" / "a").exists()  # nothing ran


@needs_quill
def test_wrong_type_in_override(recipe, tmp_path):
    done = quill("run", str(recipe), "--output-dir", "out", "a.learning_rate=fast", cwd=tmp_path)
    assert_one_line_error(done, "expected float, found 'fast'")


@needs_quill
def test_yaml_syntax_error_in_recipe(recipe, tmp_path):
    (recipe / "recipe.yaml").write_text("stages: [{name: a\n")
    assert_one_line_error(quill("run", str(recipe), cwd=tmp_path), "rec/recipe.yaml:2:", "invalid YAML")


@needs_quill
@pytest.mark.parametrize(
    "args, fragments",
    [
        (["run", "no/such/recipe"], ["recipe folder no/such/recipe not found"]),
        (["run", "{recipe}", "--from", "b"], ["--from b: recipe 'fake' has no such stage"]),
        (["run", "{recipe}", "--learning_rate", "1"], ["unrecognized arguments", "pass stage options as key=value"]),
        (["run", "{recipe}", "learnig_rate=1"], ["did you mean 'learning_rate'?"]),
        (["runn"], ["unknown command 'runn'", "did you mean 'run'?"]),
        ([], ["no command given"]),
    ],
)
def test_usage_mistakes(recipe, tmp_path, args, fragments):
    done = quill(*[a.format(recipe=recipe) for a in args], cwd=tmp_path)
    assert_one_line_error(done, *fragments)


@needs_quill
def test_stage_module_run_directly(recipe, tmp_path):
    (tmp_path / "bad.yaml").write_text("learning_rate: [1e-3\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(recipe), os.environ.get("PYTHONPATH")]))}
    env.pop("QUILL_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", "fake_stage", "--config", "bad.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_one_line_error(done, "bad.yaml:2:", "invalid YAML")


@needs_quill
def test_debug_shows_the_traceback(recipe, tmp_path):
    done = quill("--debug", "run", str(recipe), "learnig_rate=1", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")


@needs_quill
def test_crashing_stage_has_no_traceback_unless_debug(recipe, tmp_path):
    done = quill("run", str(recipe), "--output-dir", "out", "crash=true", cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "error: RuntimeError: boom (run with --debug for the traceback)" in done.stderr
    assert "stage 'a' failed (exit code 1)" in done.stderr.strip().splitlines()[-1]

    done = quill("run", str(recipe), "--output-dir", "out", "crash=true", "--debug", cwd=tmp_path)
    assert "Traceback (most recent call last)" in done.stderr and 'raise RuntimeError("boom")' in done.stderr


@pytest.mark.parametrize(
    "exc, code, expected",
    [
        (QuillError("bad\nthing", "do\nthis"), 2, "error: bad thing; fix: do this"),
        (ValueError("oops"), 1, "error: ValueError: oops (run with --debug for the traceback)"),
        (KeyboardInterrupt(), 130, "error: interrupted"),
    ],
)
def test_run_guarded(capsys, monkeypatch, exc, code, expected):
    monkeypatch.delenv("QUILL_DEBUG", raising=False)

    def boom():
        raise exc

    with pytest.raises(SystemExit) as info:
        run_guarded(boom)
    assert info.value.code == code
    assert capsys.readouterr().err == expected + "\n"
    assert run_guarded(lambda: 42) == 42


def test_run_guarded_debug_from_environment(capsys, monkeypatch):
    monkeypatch.setenv("QUILL_DEBUG", "1")
    with pytest.raises(SystemExit):
        run_guarded(lambda: 1 / 0)
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "error: ZeroDivisionError: division by zero"
