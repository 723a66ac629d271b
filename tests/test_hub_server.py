"""The loopback Hub (tests/hub_server.py) carries the real clients' push and pull round trips.

Client code runs in subprocesses (huggingface_hub reads HF_ENDPOINT at import time); each download
runs with a fresh, empty HF_HOME so nothing can come from a local cache.
"""

import json
import time
import urllib.error
import urllib.request

from hub_server import FAKE_TOKEN, spawn_hub_server

# Builds a tiny GPT-2 (built into transformers: nothing to download), pushes it twice, saves the
# reference logits. argv: work dir.
PUSH_MODEL = """
    import sys, torch, transformers
    from huggingface_hub import HfApi
    work = sys.argv[1]
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()  # eval: dropout off, logits are deterministic
    model.save_pretrained(f"{work}/model")
    api = HfApi()
    api.create_repo("user/tiny-gpt2")
    api.upload_folder(repo_id="user/tiny-gpt2", folder_path=f"{work}/model")
    model.push_to_hub("user/tiny-gpt2-pushed")
    torch.save(model(torch.arange(12).unsqueeze(0)).logits, f"{work}/logits.pt")
"""

PULL_MODEL = """
    import os, sys, torch
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM
    reference = torch.load(f"{sys.argv[1]}/logits.pt")
    for repo in ("user/tiny-gpt2", "user/tiny-gpt2-pushed"):
        model = AutoModelForCausalLM.from_pretrained(repo)
        assert torch.equal(model(torch.arange(12).unsqueeze(0)).logits, reference), repo
    files = sorted(os.listdir(snapshot_download("user/tiny-gpt2")))
    assert {"config.json", "model.safetensors"} <= set(files), files
    print("pulled", files)
"""

ROWS = {"text": ["alpha", "beta", "gamma", "delta"], "label": [0, 1, 1, 0]}

PUSH_DATASET = f"""
    from datasets import Dataset
    Dataset.from_dict({ROWS!r}).push_to_hub("user/tiny-ds")
"""

PULL_DATASET = """
    import json
    from datasets import load_dataset
    print(json.dumps(load_dataset("user/tiny-ds", split="train").to_dict()))
"""

# argv: folder to upload. Prints the exception's class and HTTP status on failure.
UPLOAD_FOLDER = """
    import sys
    from huggingface_hub import HfApi
    try:
        HfApi().upload_folder(repo_id="user/faulty", folder_path=sys.argv[1])
    except Exception as e:
        print(type(e).__name__, e.response.status_code)
        sys.exit(3)
    print("uploaded")
"""


def test_model_upload_folder_push_to_hub_and_from_pretrained(hub_server, tmp_path):
    hub_server.run_python(PUSH_MODEL, str(tmp_path))
    # model.safetensors went through the LFS batch API, config.json inline in the commit.
    assert hub_server.requests("PUT", "/_lfs/"), hub_server.log
    repo = hub_server.server.store.get("model", "user/tiny-gpt2")
    head = repo.resolve("main")
    assert {"config.json", "model.safetensors"} <= set(head.files) and "model.safetensors" in head.lfs

    pulled = hub_server.run_python(PULL_MODEL, str(tmp_path))  # fresh process, empty HF_HOME
    assert "pulled" in pulled.stdout


def test_dataset_push_to_hub_then_load_dataset(hub_server):
    hub_server.run_python(PUSH_DATASET)
    loaded = hub_server.run_python(PULL_DATASET)
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == ROWS


def test_failed_push_retries_then_fails_cleanly(hub_server, tmp_path):
    (tmp_path / "notes.txt").write_text("hello hub\n")
    hub_server.run_python("from huggingface_hub import create_repo; create_repo('user/faulty')")

    def preuploads():
        return len(hub_server.requests("POST", "/api/models/user/faulty/preupload/"))

    # Down: 503 with Retry-After 0, so the client's 5 retries take ~5 s, then it raises.
    hub_server.set_mode("down")
    start, before = time.monotonic(), preuploads()
    down = hub_server.run_python(UPLOAD_FOLDER, str(tmp_path), check=False, timeout=60)
    assert down.returncode == 3 and "HfHubHTTPError 503" in down.stdout, down.stdout + down.stderr
    assert preuploads() - before >= 2  # retried (huggingface_hub 2.4: the first try and 5 retries)
    assert time.monotonic() - start < 30

    # Refusing: 403 is not retried.
    hub_server.set_mode("refusing")
    before = preuploads()
    refused = hub_server.run_python(UPLOAD_FOLDER, str(tmp_path), check=False, timeout=30)
    assert refused.returncode == 3 and "HfHubHTTPError 403" in refused.stdout, refused.stdout + refused.stderr
    assert preuploads() - before == 1
    repo = hub_server.server.store.get("model", "user/faulty")
    assert set(repo.resolve("main").files) == {".gitattributes"}  # nothing half-committed

    # Down for two calls only: the retries get through.
    hub_server.set_mode("down", count=2)
    assert "uploaded" in hub_server.run_python(UPLOAD_FOLDER, str(tmp_path), timeout=60).stdout
    assert "notes.txt" in repo.resolve("main").files


def _call(url, method="GET", token=FAKE_TOKEN, body=None, headers=None):
    """(status, headers, body) of one request; HTTP errors are answers too."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_protocol_errors_ranges_and_listings(hub_server):
    url = hub_server.url
    assert _call(f"{url}/api/whoami-v2")[0] == 200
    assert _call(f"{url}/api/whoami-v2", token="hf_wrong")[0] == 401
    assert _call(f"{url}/api/repos/create", "POST", token=None, body={"name": "x"})[0] == 401
    assert _call(f"{url}/api/repos/create", "POST", body={"name": "x", "type": "dataset"})[0] == 200
    assert _call(f"{url}/api/repos/create", "POST", body={"name": "x", "type": "dataset"})[0] == 409

    status, headers, _ = _call(f"{url}/api/models/user/nope")
    assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")
    status, headers, _ = _call(f"{url}/datasets/user/x/resolve/main/missing.txt", "HEAD")
    assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound")
    status, headers, _ = _call(f"{url}/api/datasets/user/x/revision/nope")
    assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")

    store = hub_server.server.store
    repo = store.get("dataset", "user/x")
    store.commit(repo, "main", "add", "", {"data/a/one.txt": b"0123456789", "top.md": b"#"}, {}, [])
    status, headers, body = _call(f"{url}/datasets/user/x/resolve/main/data/a/one.txt", headers={"Range": "bytes=2-4"})
    assert (status, body, headers["Content-Range"]) == (206, b"234", "bytes 2-4/10")
    assert headers["X-Repo-Commit"] == repo.branches["main"]

    def listing(query):
        return sorted(e["path"] for e in json.loads(_call(f"{url}/api/datasets/user/x/tree/main{query}")[2]))

    assert listing("") == [".gitattributes", "data", "top.md"]
    assert listing("?recursive=true") == [".gitattributes", "data", "data/a", "data/a/one.txt", "top.md"]
    assert listing("/data%2Fa") == ["data/a/one.txt"]


def test_standalone_server_keeps_repos_across_restarts(tmp_path):
    proc, url = spawn_hub_server(tmp_path)
    try:
        assert _call(f"{url}/api/repos/create", "POST", body={"name": "kept"})[0] == 200
        assert _call(f"{url}/_test/mode", "POST", body={"mode": "refusing"})[0] == 200
        assert _call(f"{url}/api/repos/create", "POST", body={"name": "other"})[0] == 403
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    proc, url = spawn_hub_server(tmp_path)
    try:
        status, _, body = _call(f"{url}/api/models/user/kept")
        assert status == 200 and json.loads(body)["siblings"][0]["rfilename"] == ".gitattributes"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
