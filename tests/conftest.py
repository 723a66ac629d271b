"""Shared pytest fixtures. Each fixture is self-contained; add new ones below the existing ones."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # `import hub_server` works whatever pytest's import mode
    sys.path.insert(0, str(TESTS_DIR))

from hub_server import HubServer  # noqa: E402

# Under pytest-xdist (`-n auto`) every worker starts its own stage processes: split the cores between the workers so
# that torch's thread pools (one thread per core each by default) do not oversubscribe the machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

# ----------------------------------------------------------------------------- hub_server fixture

# Variables that would send a client to another cache, endpoint, token or offline mode than the
# ones `HubFixture.env` sets; they are removed from the copied environment.
_HUB_ENV_TO_DROP = (
    "HF_ENDPOINT",
    "HF_TOKEN",
    "HF_TOKEN_PATH",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_XET_CACHE",
    "HF_ASSETS_CACHE",
    "HF_DATASETS_CACHE",
    "TRANSFORMERS_CACHE",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)


class HubFixture:
    """What the `hub_server` fixture yields: a loopback Hub plus the environment to reach it.

    huggingface_hub reads HF_ENDPOINT (and the cache and Xet settings) into constants when it is
    imported, so Hub client code must run in a subprocess started with `env()`; `run_python` does
    that. In-process use of the server (e.g. `server.store`) is fine for assertions.
    """

    def __init__(self, server: HubServer, tmp_dir: Path):
        self.server = server
        self.url = server.url
        self.token = server.token
        self._tmp_dir = tmp_dir
        self._homes = itertools.count()

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ plus the Hub settings, with a fresh, empty HF_HOME on every call."""
        env = {k: v for k, v in os.environ.items() if k not in _HUB_ENV_TO_DROP}
        loopback = "127.0.0.1,localhost"
        env.update(
            HF_ENDPOINT=self.url,
            HF_TOKEN=self.token,
            HF_HOME=str(self._tmp_dir / f"hf_home_{next(self._homes)}"),
            HF_HUB_DISABLE_TELEMETRY="1",
            # LFS files (safetensors, parquet) then go through the LFS batch API this server has;
            # with Xet on, the client would ask for a Xet token and fail.
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_DATASETS_DISABLE_PROGRESS_BARS="1",
            # An ambient proxy must never see loopback traffic.
            NO_PROXY=loopback + ("," + env["NO_PROXY"] if env.get("NO_PROXY") else ""),
            no_proxy=loopback + ("," + env["no_proxy"] if env.get("no_proxy") else ""),
        )
        env.update(extra)
        return env

    def run_python(
        self, code: str, *args: str, timeout: float = 300, check: bool = True, env: dict | None = None, **extra: str
    ) -> subprocess.CompletedProcess:
        """Run `code` (dedented) in a fresh interpreter with `env()` (or `env`), capturing output.

        With `check`, a non-zero exit fails the test and shows the subprocess's output.
        """
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            env=env if env is not None else self.env(**extra),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            pytest.fail(f"subprocess exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        return proc

    def set_mode(self, mode: str, count: int | None = None) -> None:
        """'ok', 'down' (write calls get 503) or 'refusing' (403); `count`: only the next N writes."""
        self.server.set_mode(mode, count)

    @property
    def log(self) -> list[dict]:
        """Every request served so far: [{"method", "path", "status"}, ...]."""
        return self.server.log

    def requests(self, method: str, path_part: str) -> list[dict]:
        """The logged requests with this method whose path contains `path_part`."""
        return [r for r in self.log if r["method"] == method and path_part in r["path"]]


@pytest.fixture
def hub_server(tmp_path_factory):
    """A loopback Hub-protocol server (see tests/hub_server.py) for this test, stopped afterwards."""
    tmp_dir = tmp_path_factory.mktemp("hub")
    with HubServer(root=tmp_dir / "store") as server:
        yield HubFixture(server, tmp_dir)


@pytest.fixture(scope="module")
def hub_server_module(tmp_path_factory):
    """The same server, shared by every test of a module (for tests built around one expensive run)."""
    tmp_dir = tmp_path_factory.mktemp("hub")
    with HubServer(root=tmp_dir / "store") as server:
        yield HubFixture(server, tmp_dir)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A finished tiny tokenizer + pretrain folder (see tests/tiny_outputs.py), shared by the whole session."""
    from tiny_outputs import build_tiny

    return build_tiny(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def hub_with_datasets(tmp_path_factory):
    """A loopback Hub serving small copies of the datasets the recipes name, in their real schemas
    (tests/hub_datasets.py), shared by the tests of a module."""
    import hub_datasets

    tmp_dir = tmp_path_factory.mktemp("hub_data")
    with HubServer(root=tmp_dir / "store") as server:
        hub_datasets.publish(server.store)
        yield HubFixture(server, tmp_dir)


@pytest.fixture(scope="session")
def fineweb_local(tmp_path_factory):
    """The fineweb-edu copy as a local dataset repo folder (README configs + parquet shards), for tests that
    stream it without a server."""
    import hub_datasets

    return hub_datasets.write(tmp_path_factory.getbasetemp() / "datasets", hub_datasets.FINEWEB)


def streamed_pretrain_argv(out, tok, fineweb, *extra: str) -> list[str]:
    """A tiny pretraining run that streams the fineweb-edu copy (a local dataset repo folder)."""
    from tiny_outputs import pretrain_argv

    mixture = f"dataset_mixture=[{{path: {fineweb}, name: sample-10BT, max_samples: 400}}]"
    return pretrain_argv(out, tok, mixture, "streaming=true", "eval_size=8", "max_steps=8", "disable_tqdm=true", *extra)


@pytest.fixture(scope="session")
def streamed_reference(tiny, fineweb_local):
    """An uninterrupted streamed pretraining run (single process) from the tiny tokenizer, on the fineweb-edu copy;
    the streaming resume test and the FSDP test compare against it."""
    from test_resume_ddp import run_ok
    from tiny_outputs import is_done

    out = tiny["pre"].parent / "streamed_pretrain"
    if not is_done(out):
        run_ok(
            [sys.executable, "-m", "quill.stages.pretrain", *streamed_pretrain_argv(out, tiny["tok"], fineweb_local)],
            tiny["env"],
        )
    return out


@pytest.fixture(scope="session")
def tiny_post(tiny, tmp_path_factory):
    """`tiny` plus a finished tiny SFT and reward folder (see tests/tiny_outputs.py), shared by the whole session."""
    from tiny_outputs import build_post

    return build_post(tmp_path_factory.getbasetemp(), tiny)
