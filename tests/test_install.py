"""Both ends of the dependency ranges, and a real install.

A virtualenv with the lowest versions pyproject.toml allows (.ci/constraints-lowest.txt) and Quill installed into
it non-editable (a wheel, as `pip install .` does) is built once per machine and reused while pyproject.toml and the
constraints stay the same; the project is reinstalled into it every session, so it always holds this checkout's code.
The test-suite itself runs at the newest versions the ranges allow (a fresh resolution in CI).
"""

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_model import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / ".ci" / "constraints-lowest.txt"
MODEL_TESTS = [
    "tests/test_model.py",
    "tests/test_model_kernels.py",
    "tests/test_model_fused_loss.py",
    "tests/test_remote_code.py",
    "tests/test_model_encoder.py",  # the fill-mask, classification and QA pipelines, from a fresh process
    "tests/test_model_seq2seq.py",  # generation with the encoder-decoder cache, the translation pipeline
]


def lowest_pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip()] = version.strip()
    return pins


def pip(python: Path, *args: str) -> None:
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="session")
def lowest_env() -> Path:
    """The python of a virtualenv at the lowest allowed versions, with this checkout installed non-editable."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + CONSTRAINTS.read_bytes()).hexdigest()[:12]
    root = Path(os.environ.get("QUILL_TEST_VENVS", Path.home() / ".cache" / "quill" / "test-venvs"))
    root.mkdir(parents=True, exist_ok=True)
    venv, python = root / f"lowest-{key}", root / f"lowest-{key}" / "bin" / "python"
    with open(root / f".lowest-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one session builds it; another waits and reuses it
        if not (venv / "ready").exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            pip(python, f"torch=={lowest_pins()['torch']}")  # first and alone: the CPU build, not a CUDA one
            pip(python, "-c", str(CONSTRAINTS), f"{REPO}[dev]")
            (venv / "ready").write_text("")
        pip(python, "--no-deps", "--force-reinstall", str(REPO))  # this checkout's code, as a wheel, every session
    return python


def isolated_env(home: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def test_installed_package_runs_the_default_recipe_outside_the_checkout(lowest_env, tmp_path, tmp_path_factory):
    env = {
        **isolated_env(tmp_path),
        "PATH": f"{lowest_env.parent}:/usr/bin:/bin",
        "QUILL_CACHE": str(tmp_path_factory.getbasetemp() / "quill_cache"),
    }
    where = subprocess.run(
        [str(lowest_env), "-c", "import quill, transformers; print(quill.__file__); print(transformers.__version__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    module, version = where.stdout.split()
    assert module.startswith(str(lowest_env.parents[1])) and version == lowest_pins()["transformers"], where.stderr
    done = subprocess.run(
        [
            "quill",
            "run",
            "tiny",
            "--until",
            "tokenizer",
            "--output-dir",
            "out",
            "tokenizer.vocab_size=300",
            "tokenizer.dataset_mixture=[{path: quill:default/pretrain_train, max_samples: 200}]",
            "tokenizer.eval_size=10",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "tokenizer" / "quill_stage.json").read_text())["done"] is True
    assert (tmp_path / "out" / "report.md").exists()


def test_model_and_remote_code_tests_pass_at_the_lowest_versions(lowest_env):
    done = subprocess.run(
        [str(lowest_env), "-m", "pytest", "-q", "-p", "no:cacheprovider", *MODEL_TESTS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


GENERATE = """
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import transformers
model = AutoModelForCausalLM.from_pretrained({path!r}, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained({path!r}, trust_remote_code=True)  # or it asks whether to trust
ids = tokenizer.encode("the quick brown", return_tensors="pt")
out = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, output_logits=True,
                     return_dict_in_generate=True)
print(json.dumps({{"version": transformers.__version__, "tokens": out.sequences[0].tolist(),
                  "logits": [step[0].tolist() for step in out.logits]}}))
"""


def generate_in(python: Path, path: Path, home: Path) -> dict:
    from test_remote_code import BLOCK_PROJECT

    done = subprocess.run(
        [str(python), "-c", BLOCK_PROJECT + textwrap.dedent(GENERATE.format(path=str(path)))],
        cwd=home,
        env=isolated_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_checkpoint_generates_the_same_tokens_under_both_ends_of_the_range(lowest_env, tmp_path):
    import transformers

    newest = tmp_path / "saved_by_newest"
    save_checkpoint(newest)  # this process: the newest versions
    saver = (
        f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); sys.path.insert(0, {str(REPO)!r})\n"
        f"from tiny_model import save_checkpoint; save_checkpoint({str(tmp_path / 'saved_by_lowest')!r})"
    )
    subprocess.run([str(lowest_env), "-c", saver], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    for folder in (newest, tmp_path / "saved_by_lowest"):
        low = generate_in(lowest_env, folder, tmp_path)
        high = generate_in(Path(sys.executable), folder, tmp_path)
        assert low["version"] == lowest_pins()["transformers"] and high["version"] == transformers.__version__
        assert low["version"] != high["version"], "both ends are the same release: the test would prove nothing"
        assert low["tokens"] == high["tokens"], folder.name
        diff = (torch.tensor(low["logits"]) - torch.tensor(high["logits"])).abs().max().item()
        assert diff <= 1e-4, (folder.name, diff)
