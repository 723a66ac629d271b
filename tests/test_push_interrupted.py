"""An interrupted Hub push: the loopback Hub (tests/hub_server.py) drops the connection partway through an upload.

huggingface_hub retries the LFS upload itself (http_backoff on network errors) but not the commit, whose loss
surfaces as a network error; quill.hub.push_folder then retries the whole push, and huggingface_hub sends only what
the Hub lacks (the LFS batch answer skips uploaded objects, create_commit drops files whose remote oid matches and
makes no empty commit). Each test ends with the remote repo equal to the local folder, file by file (sha256 of
every file push_folder sends), and exactly one upload commit.
"""

import fnmatch
import hashlib
import json
from pathlib import Path

import pytest
from test_faults import one_error_line
from tiny_outputs import pretrain_argv, run_quill

from quill.hub import PUSH_IGNORE

PUSH = """
import sys
from pathlib import Path
from quill.hub import push_folder
print(push_folder(Path(sys.argv[1]), sys.argv[2], wait=0.1))
"""


def local_files(folder: Path) -> dict[str, str]:
    """sha256 of every file push_folder uploads (its ignore patterns applied as huggingface_hub applies them)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not any(fnmatch.fnmatch(rel, pat) for pat in PUSH_IGNORE):
            files[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def remote_files(hub, repo_id: str) -> dict[str, str]:
    """sha256 of every file on the repo's main branch, read from the server's store (the Hub's .gitattributes,
    which every new repo starts with, left out)."""
    store = hub.server.store
    head = store.get("model", repo_id).resolve("main")
    return {
        path: hashlib.sha256(store.get_blob(sha)).hexdigest()
        for path, sha in head.files.items()
        if path != ".gitattributes"
    }


def upload_commits(hub, repo_id: str) -> list[str]:
    return [c.title for c in hub.server.store.get("model", repo_id).commits.values() if c.title != "initial commit"]


def weights_oid(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "mode, match",
    [
        ("dropping", "/_lfs/"),  # the weights' upload cut off mid-body: huggingface_hub re-sends it
        ("dropping", "/commit/"),  # the commit cut off mid-body: push_folder retries, the weights are not re-sent
        ("dropping-after", "/commit/"),  # the commit made but its answer lost: the retry must not commit again
    ],
)
def test_a_dropped_connection_is_retried_and_the_repo_ends_equal_to_the_folder(mode, match, tiny, hub_server):
    folder, repo = tiny["pre"], f"user/{mode}-{match.strip('/').replace('_', '')}"
    hub_server.server.set_mode(mode, count=1, match=match)
    proc = hub_server.run_python(PUSH, str(folder), repo)
    assert repo in proc.stdout

    dropped = [r for r in hub_server.log if r["status"] == 0]
    assert len(dropped) == 1 and match in dropped[0]["path"], hub_server.log  # the fault really happened, once
    assert remote_files(hub_server, repo) == local_files(folder)
    assert upload_commits(hub_server, repo) == ["Upload Quill checkpoint"]
    lfs_puts = hub_server.requests("PUT", f"/_lfs/{weights_oid(folder)}")
    assert [r["status"] for r in lfs_puts] == ([0, 200] if match == "/_lfs/" else [200])  # sent again only if cut


def test_a_push_cut_off_every_time_fails_in_one_line_and_the_rerun_pushes_the_folder(tiny, hub_server, tmp_path):
    out, repo = tmp_path / "pushed", "user/cut"
    env = {**hub_server.env(), "QUILL_CACHE": tiny["env"]["QUILL_CACHE"], "TOKENIZERS_PARALLELISM": "false"}
    env.pop("QUILL_DEBUG", None)
    argv = ["pretrain", *pretrain_argv(out, tiny["tok"], "max_steps=2", "eval_size=0", "disable_tqdm=true",
                                       "push_to_hub=true", f"hub_model_id={repo}")]  # fmt: skip
    hub_server.server.set_mode("dropping", match="/commit/")  # every commit is cut off
    proc = run_quill(argv, env)
    line = one_error_line(proc)
    assert proc.returncode == 2 and f"push to the Hub repo '{repo}' failed after 3 attempts" in line, line
    assert json.loads((out / "quill_stage.json").read_text())["done"] is True  # the local folder is finished
    assert len(hub_server.requests("POST", f"/api/models/{repo}/commit/")) == 3
    assert remote_files(hub_server, repo) == {}  # nothing half-committed: the weights were uploaded, not committed

    hub_server.set_mode("ok")
    rerun = run_quill(argv, env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already finished" in rerun.stderr and f"pushed to {hub_server.url}/{repo}/commit/" in rerun.stderr
    assert remote_files(hub_server, repo) == local_files(out)
    assert upload_commits(hub_server, repo) == ["Upload Quill checkpoint"]
    puts = hub_server.requests("PUT", f"/_lfs/{weights_oid(out)}")
    assert [r["status"] for r in puts] == [200], puts  # uploaded once by the first run, not again by the rerun
