"""A small loopback server that speaks the Hugging Face Hub protocol, for tests.

The machines this project is tested on cannot reach the real Hub, yet the project's Hub code paths
(`push_to_hub`, `upload_folder`, `from_pretrained("user/repo")`, `snapshot_download`,
`datasets.load_dataset("user/ds")`, `Dataset.push_to_hub`) must still run for real. This server
answers the routes that huggingface_hub 2.x, transformers 5 and datasets 5 call (see
shared/notes/offline-data-and-hub.md), keeps model and dataset repos with real commits, and can be
switched into a failure mode so fault tests can watch a push retry and then fail, or have its connection
dropped partway through.

Client environment (set it *before* huggingface_hub is imported: it reads these into constants):
    HF_ENDPOINT=http://127.0.0.1:PORT  HF_TOKEN=<FAKE_TOKEN>  HF_HOME=<empty tmp dir>
    HF_HUB_DISABLE_XET=1   binary files (*.safetensors, *.parquet, ...) are answered "lfs" and go
                           through the LFS batch API served here; with Xet on, the client would ask
                           for a Xet token instead, which this server refuses (501). `--no-lfs`
                           answers "regular" for every file, which lets a client keep Xet on, but
                           then `Dataset.push_to_hub` fails: it deletes its temporary parquet
                           files after preupload, before the commit would read them.
conftest.py's `hub_server` fixture builds that environment for subprocesses.

Run it standalone (prints its URL on the first line of stdout, then serves until killed):

    python tests/hub_server.py --port 0 --root DIR

Test-control routes (no token needed; the server listens on 127.0.0.1 only):

    GET  /_test/mode                 -> {"mode": ..., "remaining": ...}
    POST /_test/mode  {"mode": "down"|"refusing"|"dropping"|"dropping-after"|"ok", "count": N|null,
                       "match": "path substring"|null}
    GET  /_test/log                  -> [{"method", "path", "status"}, ...]

"down" answers every write call (repo create/delete, preupload, commit, LFS batch and upload) with
503 and `Retry-After: 0` (the client then retries after about 1 s instead of its 1-2-4-8-8 s
backoff, which keeps fault tests short); "refusing" answers them with 403, which is not retried.
With "count" the mode applies to that many write calls and then reverts to "ok", to test
retry-then-succeed.

Dropped connections, as a network cut or a proxy timeout leaves them: "dropping" reads half of the
request body and then closes the connection without an answer (the write never happens);
"dropping-after" handles the request in full (the write happens) and closes the connection instead
of answering, so the client cannot know it succeeded. Both log status 0. With "match" a mode applies
only to write calls whose path contains that text (e.g. "/_lfs/" for LFS uploads, "/commit/"), and
only those count.

Branches: `create_branch` (`POST /api/{type}s/{repo}/branch/{name}`) starts one from a revision
(default: main); commits and downloads take any branch or commit. Private repos answer 404 to a
request without the token, as on the Hub. Repo ids without a namespace (`gpt2`) are served like any
other; they are created through `HubStore.create` (the create API puts new repos under the user).

Model and dataset cards: `/api/validate-yaml` and every commit that adds a README.md check its front
matter by the Hub's documented metadata rules (tests/hub_card_rules.py) and answer 400 with
`{"errors": [{"message": ...}]}` where the Hub would refuse it.

Downloads are counted: each log entry carries `bytes`, the body bytes served (so a test can tell
whether a client read a whole file or only the ranges it needed).

Not implemented: Xet storage, multipart LFS, pull requests, pagination (every listing fits in one
page).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import hub_card_rules

FAKE_TOKEN = "hf_quillFakeTokenForLoopbackHubTests"
FAKE_USER = "user"
DEFAULT_BRANCH = "main"
REPO_TYPES = ("model", "dataset", "space")
MODES = ("ok", "down", "refusing", "dropping", "dropping-after")
MAX_BODY_BYTES = 256 * 1024 * 1024  # tests push tiny repos; anything bigger is a bug in a test
MAX_LOG_ENTRIES = 10_000
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub stores any file above 10 MB in LFS

# The real Hub seeds every new repo with a .gitattributes (much longer) in an "initial commit";
# preupload answers "lfs" for the paths it marks, as the Hub does.
INITIAL_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.parquet", "*.arrow", "*.npy", "*.gz")
).encode()


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob: the Hub reports it as `oid`/ETag and clients compare it."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# --------------------------------------------------------------------------------------- storage


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    date: str
    files: dict[str, str]  # path -> blob sha1: a full snapshot, so lookups need no history walk
    lfs: dict[str, str] = field(default_factory=dict)  # path -> sha256, for the files stored in LFS


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit oid

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a full commit oid -> the commit, else None."""
        return self.commits.get(self.branches.get(revision, revision))


class HubStore:
    """Repos with commit history; blobs are content-addressed, in memory or under `root/blobs`.

    With a root, the metadata is also saved to `root/state.json` after every change, so a server
    restarted on the same root (e.g. in a crash test) sees the same repos.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, str] = {}  # sha256 -> blob sha1 of the uploaded LFS objects
        self.root = Path(root) if root is not None else None
        self._blobs: dict[str, bytes] = {}
        if self.root is not None:
            (self.root / "blobs").mkdir(parents=True, exist_ok=True)
            self._load_state()

    # blobs ---------------------------------------------------------------------------------
    def put_blob(self, content: bytes) -> str:
        sha = git_blob_sha1(content)
        if self.root is None:
            self._blobs[sha] = content
            return sha
        path = self.root / "blobs" / sha
        if not path.exists():
            tmp = path.with_name(f"{sha}.tmp{threading.get_ident()}")
            tmp.write_bytes(content)
            tmp.replace(path)  # atomic: a concurrent reader never sees half a blob
        return sha

    def get_blob(self, sha: str) -> bytes:
        if self.root is None:
            return self._blobs[sha]
        return (self.root / "blobs" / sha).read_bytes()

    def put_lfs_object(self, content: bytes) -> str:
        with self.lock:
            sha256 = hashlib.sha256(content).hexdigest()
            self.lfs_objects[sha256] = self.put_blob(content)
            self._save_state()
            return sha256

    # repos ---------------------------------------------------------------------------------
    def get(self, repo_type: str, repo_id: str) -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def create(self, repo_type: str, repo_id: str, private: bool) -> Repo | None:
        """Create a repo with the Hub's initial commit; None if it already exists."""
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return None
            repo = Repo(repo_type, repo_id, private)
            self.repos[(repo_type, repo_id)] = repo
            self.commit(repo, DEFAULT_BRANCH, "initial commit", "", {".gitattributes": INITIAL_GITATTRIBUTES}, {}, [])
            return repo

    def delete(self, repo_type: str, repo_id: str) -> bool:
        with self.lock:
            found = self.repos.pop((repo_type, repo_id), None) is not None
            self._save_state()
            return found

    def commit(
        self,
        repo: Repo,
        branch: str,
        title: str,
        description: str,
        added: dict[str, bytes],
        added_lfs: dict[str, str],
        deleted: list[str],
    ) -> Commit:
        """Apply deletions (a path ending in '/' is a folder), then additions, on top of `branch`.

        `added` maps paths to content; `added_lfs` maps paths to the sha256 of uploaded LFS objects.
        """
        with self.lock:
            parent = repo.resolve(branch)
            files = dict(parent.files) if parent else {}
            lfs = dict(parent.lfs) if parent else {}
            for path in deleted:
                gone = [p for p in files if p.startswith(path)] if path.endswith("/") else [path]
                for p in gone:
                    files.pop(p, None)
                    lfs.pop(p, None)
            for path, content in added.items():
                files[path] = self.put_blob(content)
                lfs.pop(path, None)
            for path, sha256 in added_lfs.items():
                files[path] = self.lfs_objects[sha256]
                lfs[path] = sha256
            seed = json.dumps([parent.oid if parent else None, title, sorted(files.items()), time.time_ns()])
            oid = hashlib.sha1(seed.encode()).hexdigest()
            commit = Commit(oid, parent.oid if parent else None, title, description, now_iso(), files, lfs)
            repo.commits[oid] = commit
            repo.branches[branch] = oid
            self._save_state()
            return commit

    # persistence ---------------------------------------------------------------------------
    def _save_state(self) -> None:
        if self.root is None:
            return
        repos = [
            {
                "repo_type": r.repo_type,
                "repo_id": r.repo_id,
                "private": r.private,
                "branches": r.branches,
                "commits": [vars(c) for c in r.commits.values()],
            }
            for r in self.repos.values()
        ]
        tmp = self.root / "state.json.tmp"
        tmp.write_text(json.dumps({"repos": repos, "lfs_objects": self.lfs_objects}))
        tmp.replace(self.root / "state.json")

    def _load_state(self) -> None:
        path = self.root / "state.json"
        if not path.exists():
            return
        state = json.loads(path.read_text())
        self.lfs_objects = state["lfs_objects"]
        for r in state["repos"]:
            repo = Repo(r["repo_type"], r["repo_id"], r["private"], branches=r["branches"])
            repo.commits = {c["oid"]: Commit(**c) for c in r["commits"]}
            self.repos[(repo.repo_type, repo.repo_id)] = repo


# ---------------------------------------------------------------------------------- HTTP layer


class HubError(Exception):
    """An error answer: status, the `X-Error-Code` the client maps to an exception, a message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository {repo_id} not found", "RepoNotFound")


# Route table: (method, pattern, handler, kind). Patterns match the still-quoted URL path, since
# clients quote revisions and tree paths with safe="" ("refs%2Fconvert%2Fparquet").
# kind "read": token optional; "write": token required and subject to the failure mode;
# "upload": the LFS PUT to the href the batch answer gave (no token, like a presigned S3 URL),
# subject to the failure mode.
_T = r"(?P<type>model|dataset|space)s"
_PREFIX = r"(?:(?P<type>dataset|space)s/)?"  # models live at /{repo}, datasets at /datasets/{repo}
_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_REV = r"(?P<rev>[^/]+)"
ROUTES = [
    ("GET", r"/_test/mode", "test_get_mode", "read"),
    ("POST", r"/_test/mode", "test_set_mode", "read"),
    ("GET", r"/_test/log", "test_log", "read"),
    ("GET", r"/api/whoami-v2", "whoami", "read"),
    ("POST", r"/api/repos/create", "create_repo", "write"),
    ("DELETE", r"/api/repos/delete", "delete_repo", "write"),
    ("POST", r"/api/validate-yaml", "validate_yaml", "read"),
    ("GET", rf"/api/{_T}/{_REPO}(?:/revision/{_REV})?", "repo_info", "read"),
    ("POST", rf"/api/{_T}/{_REPO}/preupload/{_REV}", "preupload", "write"),
    ("POST", rf"/api/{_T}/{_REPO}/commit/{_REV}", "commit", "write"),
    ("GET", rf"/api/{_T}/{_REPO}/tree/{_REV}(?:/(?P<path>.*))?", "tree", "read"),
    ("POST", rf"/api/{_T}/{_REPO}/paths-info/{_REV}", "paths_info", "read"),
    ("GET", rf"/api/{_T}/{_REPO}/refs", "refs", "read"),
    ("POST", rf"/api/{_T}/{_REPO}/branch/(?P<branch>[^/]+)", "create_branch", "write"),
    ("GET", rf"/api/{_T}/{_REPO}/xet-(?:read|write)-token/{_REV}", "xet_token", "read"),
    ("POST", rf"/{_PREFIX}{_REPO}\.git/info/lfs/objects/batch", "lfs_batch", "write"),
    ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", "lfs_upload", "upload"),
    ("POST", r"/_lfs/(?P<oid>[0-9a-f]{64})/verify", "lfs_verify", "write"),
    ("HEAD", rf"/{_PREFIX}{_REPO}/resolve/{_REV}/(?P<path>.+)", "resolve", "read"),
    ("GET", rf"/{_PREFIX}{_REPO}/resolve/{_REV}/(?P<path>.+)", "resolve", "read"),
]
COMPILED_ROUTES = [(method, re.compile(pattern + "/?"), handler, kind) for method, pattern, handler, kind in ROUTES]


class HubRequestHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive, as the clients pool connections: every answer must carry Content-Length
    # and every request body must be read, or the next request on the connection is garbled.
    protocol_version = "HTTP/1.1"
    server: HubHTTPServer

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format, *args):  # noqa: A002 - silence the per-request stderr line
        pass

    # dispatch ------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.status_sent, self.bytes_sent, self.drop_answer = 0, 0, False
        try:
            # Where a write will be cut off mid-body, the body is not drained: half of it is read, then we hang up.
            failure = self.server.failure_for(self.command, url.path)
            if failure == "dropping":
                self._drop(half_body=True)
                return
            self.body = self._read_body()  # drained first, whatever the answer will be
            handler, groups, kind = self._route(url.path)
            self._check_token(required=kind == "write")
            if kind != "read":
                self.server.check_failure_mode(failure)
            self.drop_answer = failure == "dropping-after"
            getattr(self, "h_" + handler)(**groups)
        except HubError as e:
            self._send_error(e)
        except ConnectionError:  # the client went away: nothing to answer
            self.close_connection = True
        except Exception as e:  # a bug in this server: answer 500 so the client does not hang
            self._send_error(HubError(500, f"hub_server internal error: {e!r}"))
        if self.status_sent is not None:  # None: dropped, and recorded as such
            self.server.record(self.command, self.path, self.status_sent, self.bytes_sent)

    def _drop(self, half_body: bool = False) -> None:
        """Hang up without an answer (after reading half the body, with `half_body`): the client sees its
        connection reset or closed mid-request."""
        if half_body:
            self.rfile.read(int(self.headers.get("Content-Length") or 0) // 2)
        self.close_connection = True
        with contextlib.suppress(OSError):  # the client may have gone already
            self.connection.shutdown(socket.SHUT_RDWR)
        self.server.record(self.command, self.path, 0, 0)

    def _route(self, path: str) -> tuple[str, dict, str]:
        for method, pattern, handler, kind in COMPILED_ROUTES:
            m = pattern.fullmatch(path)
            if m and method == self.command:
                groups = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                if "repo" in groups:
                    groups.setdefault("type", "model")
                return handler, groups, kind
        raise HubError(404, f"No route for {self.command} {path} in the test hub")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # cannot drain it cheaply: drop the connection instead
            raise HubError(413, "Request body too large for the test hub")
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        chunks, total = [], 0
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                self.close_connection = True
                raise HubError(413, "Request body too large for the test hub")
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # the CRLF after each chunk

    def _check_token(self, required: bool) -> None:
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer ") :].strip() if auth.startswith("Bearer ") else None
        if token is not None and token != self.server.token:
            # This exact message makes the client report a bad token, not a missing repo.
            raise HubError(401, "Invalid credentials in Authorization header")
        self.authenticated = token is not None
        if required and not self.authenticated:
            raise HubError(401, "Invalid credentials in Authorization header")

    # answers -------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json", headers=None) -> None:
        if self.drop_answer:  # "dropping-after": the request took effect; its answer is lost
            self._drop()
            self.status_sent = None  # recorded already, as 0
            return
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            self.bytes_sent = len(body)
        self.status_sent = status

    def _send_json(self, obj, status: int = 200, headers=None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _send_error(self, e: HubError) -> None:
        headers = {"X-Error-Message": e.message, **e.headers}
        if e.code:
            headers["X-Error-Code"] = e.code
        try:
            self._send_json({"error": e.message}, e.status, headers)
        except ConnectionError:  # the client went away: nothing to answer
            self.close_connection = True

    def _json_body(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise HubError(400, "Body is not valid JSON") from None

    def _flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")

    # lookups -------------------------------------------------------------------------------
    def _repo(self, type: str, repo: str) -> Repo:
        found = self.server.store.get(type, repo)
        if found is None or (found.private and not self.authenticated):
            raise repo_not_found(repo)
        return found

    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _repo_url(self, repo: Repo) -> str:
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return f"{self.server.url}/{prefix}{repo.repo_id}"

    def _size(self, sha: str) -> int:
        return len(self.server.store.get_blob(sha))

    def _lfs_info(self, commit: Commit, path: str) -> dict | None:
        sha256 = commit.lfs.get(path)
        if sha256 is None:
            return None
        return {"oid": sha256, "size": self._size(commit.files[path]), "pointerSize": 134}

    # test control --------------------------------------------------------------------------
    def h_test_get_mode(self):
        self._send_json(self.server.mode_info())

    def h_test_set_mode(self):
        body = self._json_body()
        if body.get("mode") not in MODES:
            raise HubError(400, f"mode must be one of {MODES}")
        self.server.set_mode(body["mode"], body.get("count"), body.get("match"))
        self._send_json(self.server.mode_info())

    def h_test_log(self):
        self._send_json(self.server.log_entries())

    # account and repos ---------------------------------------------------------------------
    def h_whoami(self):
        if not self.authenticated:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._send_json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": FAKE_USER,
                "fullname": "Quill Test User",
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}},
            }
        )

    def h_create_repo(self):
        body = self._json_body()
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES or not body.get("name"):
            raise HubError(400, "Invalid repo type or name")
        repo_id = f"{body.get('organization') or FAKE_USER}/{body['name']}"
        private = body.get("private") is True or body.get("visibility") == "private"
        repo = self.server.store.create(repo_type, repo_id, private)
        if repo is None:
            # create_repo(exist_ok=True) treats exactly this status as "already there", then reads the repo's url
            # from the body, as the Hub sends it.
            message = f"You already created this {repo_type} repo"
            url = self._repo_url(self.server.store.get(repo_type, repo_id))
            self._send_json({"error": message, "url": url}, 409, {"X-Error-Message": message})
            return
        self._send_json({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def h_delete_repo(self):
        body = self._json_body()
        repo_id = f"{body.get('organization') or FAKE_USER}/{body.get('name')}"
        if not self.server.store.delete(body.get("type") or "model", repo_id):
            raise repo_not_found(repo_id)
        self._send_json({})

    def h_validate_yaml(self):
        body = self._json_body()
        errors, warnings = hub_card_rules.validate(str(body.get("content", "")), body.get("repoType") or "model")
        answer = {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}
        self._send_json(answer, 400 if errors else 200)

    def h_repo_info(self, type, repo, rev=DEFAULT_BRANCH):
        found = self._repo(type, repo)
        commit = self._commit_at(found, rev)
        siblings = []
        for path, sha in sorted(commit.files.items()):
            sibling = {"rfilename": path, "size": self._size(sha), "blobId": sha}
            if (lfs := self._lfs_info(commit, path)) is not None:
                sibling["lfs"] = {"size": lfs["size"], "sha256": lfs["oid"], "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        first_commit = next(iter(found.commits.values()))
        self._send_json(
            {
                "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                "id": repo,
                "author": repo.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": first_commit.date,
                "private": found.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    def h_create_branch(self, type, repo, branch):
        found = self._repo(type, repo)
        if branch in found.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._json_body().get("startingPoint") or DEFAULT_BRANCH
        commit = self._commit_at(found, start)
        with self.server.store.lock:
            found.branches[branch] = commit.oid
            self.server.store._save_state()
        self._send_json({})

    def h_refs(self, type, repo):
        found = self._repo(type, repo)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in found.branches.items()]
        self._send_json({"branches": branches, "converts": [], "tags": []})

    # uploads -------------------------------------------------------------------------------
    def h_preupload(self, type, repo, rev):
        found = self._repo(type, repo)
        current = found.resolve(rev)
        lfs_patterns = self._lfs_patterns(current)
        answer = []
        for f in self._json_body().get("files", []):
            path = f["path"]
            is_lfs = self.server.lfs and (
                f.get("size", 0) > LFS_SIZE_THRESHOLD
                or any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in lfs_patterns)
            )
            # `oid` lets the client skip files that did not change: git sha1, or sha256 for LFS.
            oid = None
            if current is not None and path in current.files:
                oid = current.lfs.get(path) or current.files[path]
            mode = "lfs" if is_lfs else "regular"
            answer.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json({"files": answer, "commitOid": current.oid if current else None})

    def _lfs_patterns(self, commit: Commit | None) -> list[str]:
        """Patterns marked `filter=lfs` in the repo's .gitattributes."""
        if commit is None or ".gitattributes" not in commit.files:
            return []
        text = self.server.store.get_blob(commit.files[".gitattributes"]).decode(errors="replace")
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line and line.split()]

    def h_lfs_batch(self, type, repo):
        self._repo(type, repo)  # checks that it exists and is readable
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "The test hub's LFS batch API only handles uploads")
        objects = []
        for obj in body.get("objects", []):
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.server.store.lfs_objects:  # no "actions" = already uploaded
                href = f"{self.server.url}/_lfs/{obj['oid']}"
                answer["actions"] = {"upload": {"href": href}, "verify": {"href": href + "/verify"}}
            objects.append(answer)
        self._send_json({"transfer": "basic", "objects": objects})

    def h_lfs_upload(self, oid):
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match its sha256 oid")
        self.server.store.put_lfs_object(self.body)
        self._send(200)

    def h_lfs_verify(self, oid):
        if oid not in self.server.store.lfs_objects:
            raise HubError(404, f"LFS object {oid} was not uploaded")
        self._send_json({"success": True})

    def h_xet_token(self, type, repo, rev):
        raise HubError(501, "The test hub has no Xet storage: run the client with HF_HUB_DISABLE_XET=1")

    def h_commit(self, type, repo, rev):
        found = self._repo(type, repo)
        if self._flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by the test hub")
        if rev not in found.branches:
            raise HubError(404, f"Invalid rev id: {rev} (the test hub commits to branches only)", "RevisionNotFound")
        header, added, added_lfs, deleted = self._parse_commit_payload()
        if "README.md" in added:  # the Hub checks a card's metadata on commit too, whatever the client did
            errors, _ = hub_card_rules.validate(added["README.md"].decode(errors="replace"), found.repo_type)
            if errors:
                raise HubError(400, "Invalid metadata in README.md: " + "; ".join(errors))
        parent = header.get("parentCommit")
        if parent and parent != found.branches[rev]:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        commit = self.server.store.commit(
            found, rev, header.get("summary") or "", header.get("description") or "", added, added_lfs, deleted
        )
        self._send_json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(found)}/commit/{commit.oid}",
                "pullRequestUrl": None,
                "hookOutput": "",
            }
        )

    def _parse_commit_payload(self) -> tuple[dict, dict[str, bytes], dict[str, str], list[str]]:
        """NDJSON lines {"key": "header"|"file"|"lfsFile"|"deletedFile"|"deletedFolder", "value": ...}."""
        header: dict = {}
        added: dict[str, bytes] = {}
        added_lfs: dict[str, str] = {}
        deleted: list[str] = []
        for line in self.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                content = value.get("content", "")
                encoded = value.get("encoding") == "base64"
                added[value["path"]] = base64.b64decode(content) if encoded else content.encode()
            elif key == "lfsFile":
                if value.get("oid") not in self.server.store.lfs_objects:
                    raise HubError(422, f"LFS object for {value.get('path')} was never uploaded")
                added_lfs[value["path"]] = value["oid"]
            elif key == "deletedFile":
                deleted.append(value["path"])
            elif key == "deletedFolder":
                deleted.append(value["path"].rstrip("/") + "/")
            else:
                raise HubError(400, f"Unknown commit operation key {key!r}")
        return header, added, added_lfs, deleted

    # listings ------------------------------------------------------------------------------
    def h_tree(self, type, repo, rev, path=""):
        commit = self._commit_at(self._repo(type, repo), rev)
        path = path.strip("/")
        expand = self._flag("expand")
        if path in commit.files:  # the Hub lists a file path as that one entry
            entries = [self._entry(commit, path, True, expand)]
        elif path and not self._is_folder(commit, path):
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        else:
            entries = self._list_folder(commit, path, self._flag("recursive"), expand)
        self._send_json(entries)

    def h_paths_info(self, type, repo, rev):
        commit = self._commit_at(self._repo(type, repo), rev)
        form = parse_qs(self.body.decode())  # form-encoded: paths=a&paths=b&expand=True
        expand = form.get("expand", ["false"])[-1].lower() in ("1", "true")
        entries = []
        for path in form.get("paths", []):  # missing paths are left out, as on the Hub
            path = path.strip("/")
            if path in commit.files:
                entries.append(self._entry(commit, path, True, expand))
            elif self._is_folder(commit, path):
                entries.append(self._entry(commit, path, False, expand))
        self._send_json(entries)

    @staticmethod
    def _is_folder(commit: Commit, path: str) -> bool:
        return any(p.startswith(path + "/") for p in commit.files)

    def _list_folder(self, commit: Commit, folder: str, recursive: bool, expand: bool) -> list[dict]:
        prefix = folder + "/" if folder else ""
        files, folders = set(), set()
        for path in commit.files:
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            # The folders between `folder` and the file: all of them if recursive, else the first.
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                files.add(path)
        return [self._entry(commit, p, False, expand) for p in sorted(folders)] + [
            self._entry(commit, p, True, expand) for p in sorted(files)
        ]

    def _entry(self, commit: Commit, path: str, is_file: bool, expand: bool) -> dict:
        if is_file:
            sha = commit.files[path]
            entry = {"type": "file", "oid": sha, "size": self._size(sha), "path": path}
            if (lfs := self._lfs_info(commit, path)) is not None:
                entry["lfs"] = lfs
        else:
            tree_oid = hashlib.sha1(f"{commit.oid}:{path}".encode()).hexdigest()
            entry = {"type": "directory", "oid": tree_oid, "size": 0, "path": path}
        if expand:  # the Hub gives the last commit that touched the path; the head is close enough
            entry["lastCommit"] = {"id": commit.oid, "title": commit.title, "date": commit.date}
        return entry

    # downloads -----------------------------------------------------------------------------
    def h_resolve(self, type, repo, rev, path):
        commit = self._commit_at(self._repo(type, repo), rev)
        sha = commit.files.get(path)
        if sha is None:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        content = self.server.store.get_blob(sha)
        # The client names cached blobs by ETag: the git sha1, or the sha256 for LFS files.
        etag = commit.lfs.get(path, sha)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if path in commit.lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(content))})
        status, content = self._apply_range(content, headers)
        self._send(status, content, "application/octet-stream", headers)

    def _apply_range(self, content: bytes, headers: dict) -> tuple[int, bytes]:
        """Honour a single `Range: bytes=a-b` (HfFileSystem reads files by ranges)."""
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if not m or not (m.group(1) or m.group(2)) or self.command == "HEAD":
            return 200, content
        size = len(content)
        if m.group(1):
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        else:  # suffix range: the last N bytes
            start, end = max(size - int(m.group(2)), 0), size - 1
        if start >= size or start > end:
            headers["Content-Range"] = f"bytes */{size}"
            return 416, b""
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return 206, content[start : end + 1]


class HubHTTPServer(ThreadingHTTPServer):
    """The threading server plus what the handlers share: store, token, failure mode, request log."""

    daemon_threads = True  # a client that keeps its connection open never blocks shutdown

    def __init__(self, port: int = 0, root=None, token: str = FAKE_TOKEN, lfs: bool = True):
        super().__init__(("127.0.0.1", port), HubRequestHandler)
        self.store = HubStore(root)
        self.token = token
        self.lfs = lfs  # False: preupload answers "regular" for every file (for clients with Xet on)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._state_lock = threading.Lock()
        self._mode, self._remaining, self._match = "ok", None, None
        self._log: list[dict] = []

    # failure mode --------------------------------------------------------------------------
    def set_mode(self, mode: str, count: int | None = None, match: str | None = None) -> None:
        """'ok', 'down' (503), 'refusing' (403), 'dropping' or 'dropping-after' (connection closed before or after
        the write) for write calls; `count` limits it to N calls, `match` to calls whose path contains it."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        with self._state_lock:
            self._mode, self._remaining, self._match = mode, count, match

    def mode_info(self) -> dict:
        with self._state_lock:
            return {"mode": self._mode, "remaining": self._remaining, "match": self._match}

    def failure_for(self, method: str, path: str) -> str:
        """The mode this request meets ('ok' for reads and unmatched paths), counted against `count`."""
        if not any(m == method and p.fullmatch(path) and kind != "read" for m, p, _, kind in COMPILED_ROUTES):
            return "ok"
        with self._state_lock:
            mode = self._mode
            if mode == "ok" or (self._match is not None and self._match not in path):
                return "ok"
            if self._remaining is not None:
                self._remaining -= 1
                if self._remaining <= 0:
                    self._mode, self._remaining, self._match = "ok", None, None
        return mode

    def check_failure_mode(self, mode: str) -> None:
        """Answer a write call as the mode `failure_for` gave it says: 503 when down, 403 when refusing."""
        if mode == "down":
            raise HubError(503, "Service Unavailable (the test hub is down)", headers={"Retry-After": "0"})
        if mode == "refusing":
            raise HubError(403, "Forbidden (the test hub refuses writes)")

    # request log ---------------------------------------------------------------------------
    def record(self, method: str, path: str, status: int, nbytes: int = 0) -> None:
        with self._state_lock:
            self._log.append({"method": method, "path": path, "status": status, "bytes": nbytes})
            del self._log[:-MAX_LOG_ENTRIES]

    def log_entries(self) -> list[dict]:
        with self._state_lock:
            return list(self._log)


class HubServer:
    """A HubHTTPServer serving from a background thread: `start()`, `.url`, `.token`, `stop()`."""

    def __init__(self, root=None, port: int = 0, token: str = FAKE_TOKEN, lfs: bool = True):
        self.httpd = HubHTTPServer(port, root, token, lfs)
        self.url, self.token = self.httpd.url, token
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    def set_mode(self, mode: str, count: int | None = None, match: str | None = None) -> None:
        self.httpd.set_mode(mode, count, match)

    @property
    def log(self) -> list[dict]:
        return self.httpd.log_entries()

    @property
    def store(self) -> HubStore:
        return self.httpd.store

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def spawn_hub_server(root, timeout: float = 15) -> tuple[subprocess.Popen, str]:
    """Start this file as its own process on a free port; returns (process, url).

    For tests that must stop the server abruptly (kill it mid-push, restart it on the same root).
    The caller terminates the process.
    """
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--port", "0", "--root", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    # The first stdout line is the URL; read it on a thread so a server that hangs cannot hang us.
    first_line: list[str] = []
    reader = threading.Thread(target=lambda: first_line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not first_line or not first_line[0].startswith("http://127.0.0.1:"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"hub_server.py did not print its URL within {timeout} s")
    return proc, first_line[0].strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Loopback Hugging Face Hub-protocol server for tests.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--root", default=None, help="folder for blobs and state.json (default: in memory)")
    parser.add_argument("--token", default=FAKE_TOKEN)
    parser.add_argument("--no-lfs", action="store_true", help='answer "regular" for every file (clients with Xet on)')
    args = parser.parse_args(argv)
    httpd = HubHTTPServer(args.port, args.root, args.token, lfs=not args.no_lfs)
    print(httpd.url, flush=True)  # a parent process reads this line to learn the port
    try:
        httpd.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])
