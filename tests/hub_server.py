"""A loopback Hugging Face Hub: the real ``huggingface_hub`` client talks HTTP to it on 127.0.0.1.

Standard library only (``http.server``, ``json``, ``hashlib``).  It speaks the subset of the
Hub protocol that ``huggingface_hub`` 2.4 uses to create repos, commit (regular and Git LFS
files), tag, branch, list and download, so publish/download code can be tested end to end
with no network and no patched client functions.

Client switches (huggingface_hub 2.4), all module attributes of ``huggingface_hub.constants``:

* ``HF_HUB_DISABLE_XET``: must be ``True``, or the client uploads through Xet (a
  ``/xet-write-token/`` call this server does not serve) and ``upload_folder`` takes its
  pipelined multi-commit path.  The attribute is read at every call
  (``utils._runtime.is_xet_available()``), so setting it at run time works.  The environment
  variable ``HF_HUB_DISABLE_XET=1`` is read only once, when ``huggingface_hub.constants`` is
  first imported; setting it later has no effect.
* ``HF_HUB_OFFLINE``: read at every request by the client's request hook
  (``constants.is_offline_mode()``, which raises ``OfflineModeIsEnabled``) and by the cache
  fall-backs of ``hf_hub_download`` / ``snapshot_download``; transformers asks the same
  function.  Flip the attribute at run time; the environment variables (``HF_HUB_OFFLINE``,
  ``TRANSFORMERS_OFFLINE``) are read only at import.  ``tests/conftest.py`` sets
  ``HF_HUB_OFFLINE=1`` before the import, so every Hub test must set the attribute to ``False``.
* ``HF_HUB_DISABLE_TELEMETRY``: with it ``False``, building request headers calls
  ``detect_agent()``, which GETs ``{constants.ENDPOINT}/api/agent-harnesses`` (huggingface.co,
  not the ``endpoint=`` passed to the call) once per process.  Keep it ``True``.

:func:`hub_client_settings` sets the three switches and restores them on exit; the ``hub``
fixture uses it.  Pass ``endpoint=hub.url`` to every client call (``HF_ENDPOINT`` is also read at
import only).

Behaviour, mirroring the Hub where it matters to a client:

* A new repo has one commit, "initial commit", holding the Hub's default ``.gitattributes``.
* ``preupload`` answers ``"lfs"`` for a path matched by the branch's ``.gitattributes`` LFS
  patterns (``*.safetensors``, ``*.bin``, ...), for a file of ``lfs_threshold`` bytes or more
  (default 1 MB; the Hub uses 10 MB), and for a sample with a NUL byte; ``"regular"`` otherwise.
  It returns the ``oid`` of a path that already exists, so the client drops unchanged files and
  skips a commit that would change nothing (no request is sent, ``upload_folder`` returns the
  current head).  A commit request with no operations is still accepted and makes an empty
  commit, as git does.
* LFS objects go to ``PUT {url}/lfs-upload/{oid}?ticket=...`` (no auth, like a signed storage
  URL) plus a ``verify`` call; the sha256 and size of the body are checked.  Objects already
  stored get no actions in the batch answer, so the client skips them.
* Downloads are served by ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` without redirects, with
  ``X-Repo-Commit``, ``ETag`` (git blob sha1 for regular files, sha256 for LFS files),
  ``X-Linked-Etag`` / ``X-Linked-Size`` for LFS files, and ``Range`` support.  No Xet headers.
* Reads of public repos need no token; writes and reads of private repos need
  ``Authorization: Bearer <token>``.  Errors carry ``X-Error-Code`` (``RepoNotFound``,
  ``RevisionNotFound``, ``EntryNotFound``) so the client raises its typed errors.

Not implemented: pull requests, Xet, multipart LFS uploads, gated repos, pagination (every
listing is returned in one page), renames, settings.

On disk under ``root``: ``objects/<sha256[:2]>/<sha256>`` (content-addressed file bytes) and
``repos/<type>s/<namespace>/<name>.json`` (refs and commits).  A new server on the same root
serves the same repos.  A commit record::

    {"oid": <40 hex>, "parent": <oid or None>, "message": ..., "description": ..., "date": ...,
     "files": {path: {"sha256": <of the content>, "size": int, "lfs": bool,
                      "git_oid": <git blob sha1 of what git stores: the content, or the LFS pointer>,
                      "stored": <sha256 of the bytes served instead, only after tamper()>}}}

Example::

    with hub_client_settings(), HubServer(tmp_path) as hub:
        api = HfApi(endpoint=hub.url, token=hub.token)
        api.create_repo("tester/demo")
        api.upload_folder(repo_id="tester/demo", folder_path=folder)
        snapshot_download("tester/demo", endpoint=hub.url, cache_dir=cache)
"""

from __future__ import annotations

import base64
import contextlib
import copy
import fnmatch
import hashlib
import json
import re
import secrets
import socket
import sys
import tempfile
import threading
import traceback
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

# The Hub's default .gitattributes for a new repo (the LFS lines).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
        "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
        "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
        "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
        "*.zst", "*tfevents*",
    )
)  # fmt: skip

_PLURAL_TO_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_PREFIX = re.compile(r"^[0-9a-f]{7,40}$")
_CHUNK = 1 << 20
_JSON = "application/json"


# ------------------------------------------------------------------------------ helpers


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob holding ``data``: sha1 of ``b"blob <size>\\0" + data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer file git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _file_entry(sha256: str, size: int, *, lfs: bool, content: bytes | None = None) -> dict[str, Any]:
    stored = lfs_pointer(sha256, size) if lfs else content
    assert stored is not None
    return {"sha256": sha256, "size": size, "lfs": lfs, "git_oid": git_blob_oid(stored)}


class _HttpError(Exception):
    """An error answer: status, message (JSON ``error`` and ``X-Error-Message``), ``X-Error-Code``."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = dict(headers or {}), dict(body or {})


class _Dropped(Exception):
    """Raised by a fault: close the connection without answering."""


class _Repo:
    """One repo's refs and commits (file bytes live in the shared object store)."""

    def __init__(self, repo_type: str, repo_id: str, private: bool, created_at: str):
        self.repo_type, self.repo_id, self.private, self.created_at = repo_type, repo_id, private, created_at
        self.branches: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.commits: dict[str, dict[str, Any]] = {}

    def to_json(self) -> dict[str, Any]:
        return {
            "repo_type": self.repo_type, "repo_id": self.repo_id, "private": self.private,
            "created_at": self.created_at, "branches": self.branches, "tags": self.tags,
            "commits": self.commits,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Repo:
        repo = cls(data["repo_type"], data["repo_id"], data["private"], data["created_at"])
        repo.branches, repo.tags, repo.commits = data["branches"], data["tags"], data["commits"]
        return repo


# ------------------------------------------------------------------------------ server


class HubServer:
    """A Hub on ``127.0.0.1`` for tests; see the module docstring for what it serves.

    Args:
        root: Directory for the object store and repo records (created if missing).
        token: The one valid token (``Authorization: Bearer <token>``).
        user: The token's user name; the namespace of ``create_repo("name")``.
        lfs_threshold: Files of this many bytes or more are uploaded through LFS.

    Attributes:
        url: ``"http://127.0.0.1:<port>"`` once started.
        requests: ``(method, path)`` of every request received, path unquoted and without the
            query string, e.g. ``("POST", "/api/models/tester/demo/commit/main")``.
        errors: Tracebacks of unexpected server errors (answered with 500); a test can assert
            it stays empty.
    """

    def __init__(self, root: Path, token: str = "hf_test_token", user: str = "tester", lfs_threshold: int = 1_000_000):
        self.root = Path(root)
        self.token = token
        self.user = user
        self.lfs_threshold = lfs_threshold
        self.url = ""
        self.requests: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._tickets: dict[str, tuple[str, int]] = {}  # upload ticket -> (oid, size)
        self._faults: dict[str, list[Any]] = {
            kind: [] for kind in ("drop_upload", "reject_upload", "drop_commit", "drop_download")
        }
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        for path in sorted((self.root / "repos").glob("*/*/*.json")):
            repo = _Repo.from_json(json.loads(path.read_text()))
            self._repos[(repo.repo_type, repo.repo_id)] = repo

    # -- lifecycle

    def start(self) -> HubServer:
        """Bind a free port on 127.0.0.1 and serve from a daemon thread. Returns ``self``."""
        if self._httpd is not None:
            raise RuntimeError("HubServer already started")
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.hub = self
        self._httpd = httpd
        self.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection (state on disk is kept)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- fault injection

    def drop_next_upload(self, after_bytes: int = 1024, times: int = 1) -> None:
        """The next ``times`` LFS PUTs: read ``after_bytes`` of the body, then close without answering.

        huggingface_hub retries a PUT that fails this way 5 times, waiting 1, 2, 4, 8, 8 s, so
        ``times`` up to 5 only slows the upload down; 6 makes ``upload_folder`` raise (~23 s).
        """
        with self._lock:
            self._faults["drop_upload"] += [after_bytes] * times

    def reject_next_upload(self, status: int = 403, times: int = 1) -> None:
        """Answer the next ``times`` LFS PUTs with ``status`` (body read, nothing stored).

        A 4xx is not retried by the client, so ``upload_folder`` raises at once; 408, 429 and
        5xx are retried like a dropped connection.
        """
        with self._lock:
            self._faults["reject_upload"] += [status] * times

    def drop_next_commit(self) -> None:
        """Read the next commit request, make no commit, close without answering.

        The client sends commits without retry, so ``create_commit`` / ``upload_folder`` raise
        ``httpx2.RemoteProtocolError`` after every LFS object has been uploaded.
        """
        with self._lock:
            self._faults["drop_commit"].append(True)

    def drop_next_download(self, after_bytes: int = 1024) -> None:
        """The next file GET: send the headers and ``after_bytes`` of the body, then close.

        The client resumes with a ``Range`` request after 1 s.
        """
        with self._lock:
            self._faults["drop_download"].append(after_bytes)

    def tamper(self, repo_id: str, path: str, data: bytes, revision: str = "main", repo_type: str = "model") -> None:
        """Serve ``data`` for ``path`` at ``revision`` without changing its recorded metadata.

        The recorded sha256, size, ETag and LFS info stay those of the committed file, so
        ``HEAD`` answers as before; ``GET`` returns ``data`` (with its own ``Content-Length``).
        The change applies to the commit ``revision`` resolves to, under every ref naming it.
        """
        with self._lock:
            repo = self._repo_or_raise(repo_type, repo_id)
            commit = repo.commits[self._oid_or_raise(repo, revision)]
            if path not in commit["files"]:
                raise KeyError(f"{path!r} is not in {repo_id}@{revision}")
            # A new entry: entries are shared between the commits of one session in memory.
            commit["files"][path] = {**commit["files"][path], "stored": self._store_bytes(data)}
            self._save(repo)

    # -- introspection for tests

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """The commit oid ``revision`` (branch, tag or oid) resolves to."""
        with self._lock:
            return self._oid_or_raise(self._repo_or_raise(repo_type, repo_id), revision)

    def commit(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, Any]:
        """A copy of the commit record ``revision`` resolves to (see the module docstring)."""
        with self._lock:
            repo = self._repo_or_raise(repo_type, repo_id)
            return copy.deepcopy(repo.commits[self._oid_or_raise(repo, revision)])

    # -- internals: state (callers hold self._lock where state is read or changed)

    def _log(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def _take_fault(self, kind: str) -> Any:
        with self._lock:
            queue = self._faults[kind]
            return queue.pop(0) if queue else None

    def _repo_or_raise(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r}")
        return repo

    def _oid_or_raise(self, repo: _Repo, revision: str) -> str:
        try:
            return self._resolve(repo, revision)
        except _HttpError as err:
            raise KeyError(f"{repo.repo_id}: {err.message}") from None

    def _object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256[:2] / sha256

    def _has_object(self, sha256: str, size: int) -> bool:
        path = self._object_path(sha256)
        return path.is_file() and path.stat().st_size == size

    def _store_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._object_path(sha256)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root / "tmp", delete=False) as tmp:
                tmp.write(data)
            Path(tmp.name).replace(path)
        return sha256

    def _save(self, repo: _Repo) -> None:
        path = self.root / "repos" / f"{repo.repo_type}s" / f"{repo.repo_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(repo.to_json(), indent=1, sort_keys=True))
        tmp.replace(path)

    def _resolve(self, repo: _Repo, revision: str) -> str:
        """Branch, tag (bare or ``refs/heads/`` / ``refs/tags/``), full oid or unique oid prefix."""
        if revision.startswith("refs/heads/") and revision[11:] in repo.branches:
            return repo.branches[revision[11:]]
        if revision.startswith("refs/tags/") and revision[10:] in repo.tags:
            return repo.tags[revision[10:]]
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if _COMMIT_PREFIX.match(revision):
            found = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(found) == 1:
                return found[0]
        raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _branch(self, repo: _Repo, revision: str) -> str:
        """The branch name a write to ``revision`` goes to."""
        name = revision[11:] if revision.startswith("refs/heads/") else revision
        if name in repo.branches:
            return name
        if name in repo.tags or (_COMMIT_PREFIX.match(name) and any(o.startswith(name) for o in repo.commits)):
            raise _HttpError(400, f"Invalid rev id: {revision} is not a branch; commits go to a branch")
        raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _new_commit(
        self, repo: _Repo, parent: str | None, files: dict[str, dict[str, Any]], message: str, description: str = ""
    ) -> str:
        date = _now()
        seed = json.dumps([repo.repo_id, parent, sorted(files.items()), message, date, uuid.uuid4().hex])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = {
            "oid": oid, "parent": parent, "files": files, "message": message,
            "description": description, "date": date,
        }  # fmt: skip
        return oid

    def _lfs_patterns(self, files: dict[str, dict[str, Any]]) -> list[str]:
        entry = files.get(".gitattributes")
        if entry is None:
            return []
        text = self._object_path(entry.get("stored", entry["sha256"])).read_text(errors="replace")
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line.split()[1:]]

    def _upload_mode(self, patterns: list[str], path: str, size: int, sample: bytes) -> str:
        name = path.rsplit("/", 1)[-1]
        matched = any(fnmatch.fnmatchcase(path if "/" in p else name, p) for p in patterns)
        return "lfs" if matched or size >= self.lfs_threshold or b"\0" in sample else "regular"

    def _last_commit(self, repo: _Repo, oid: str, path: str) -> dict[str, str]:
        """The newest commit, from ``oid`` back, that changed ``path`` (a file or a folder)."""

        def view(commit: dict[str, Any]) -> list[tuple[str, str]]:
            files = commit["files"]
            return sorted((p, files[p]["git_oid"]) for p in files if p == path or p.startswith(path + "/"))

        commit = repo.commits[oid]
        while commit["parent"] is not None:
            parent = repo.commits[commit["parent"]]
            if view(commit) != view(parent):
                break
            commit = parent
        return {"id": commit["oid"], "title": commit["message"], "date": commit["date"]}

    # -- internals: endpoint bodies (called by _Handler)

    def _auth(self, handler: _Handler) -> bool:
        return handler.headers.get("Authorization", "") == f"Bearer {self.token}"

    def _require_auth(self, handler: _Handler) -> None:
        if self._auth(handler):
            return
        if handler.headers.get("Authorization"):
            raise _HttpError(401, "Invalid credentials in Authorization header")
        raise _HttpError(401, "You must be authenticated to access this resource (no token sent)")

    def _readable(self, handler: _Handler, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HttpError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        if repo.private and not self._auth(handler):
            raise _HttpError(401, "Invalid username or password.", "RepoNotFound")
        return repo

    def _writable(self, handler: _Handler, repo_type: str, repo_id: str) -> _Repo:
        self._require_auth(handler)
        return self._readable(handler, repo_type, repo_id)

    def _whoami(self, handler: _Handler) -> dict[str, Any]:
        self._require_auth(handler)
        return {
            "type": "user", "id": hashlib.sha1(self.user.encode()).hexdigest()[:24], "name": self.user,
            "fullname": self.user, "email": f"{self.user}@example.invalid", "emailVerified": True,
            "canPay": False, "isPro": False, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
        }  # fmt: skip

    def _create_repo(self, handler: _Handler, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self._require_auth(handler)
        name, namespace = body.get("name"), body.get("organization") or self.user
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HttpError(400, f"Invalid repo type: {repo_type}")
        if not isinstance(name, str) or not _REPO_NAME.match(name) or "--" in name or ".." in name:
            raise _HttpError(400, f"Invalid repo name: {name!r}")
        if not _REPO_NAME.match(namespace):
            raise _HttpError(400, f"Invalid namespace: {namespace!r}")
        repo_id = f"{namespace}/{name}"
        url = f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                # The client reads "url" from the 409 answer when exist_ok=True.
                raise _HttpError(409, f"You already created this {repo_type} repo", body={"url": url})
            private = body.get("visibility", "private" if body.get("private") else "public") == "private"
            repo = _Repo(repo_type, repo_id, private, _now())
            attributes = DEFAULT_GITATTRIBUTES.encode()
            sha = self._store_bytes(attributes)
            files = {".gitattributes": _file_entry(sha, len(attributes), lfs=False, content=attributes)}
            repo.branches["main"] = self._new_commit(repo, None, files, "initial commit")
            self._repos[(repo_type, repo_id)] = repo
            self._save(repo)
        return 200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex[:24]}

    def _delete_repo(self, handler: _Handler, body: dict[str, Any]) -> dict[str, Any]:
        self._require_auth(handler)
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or self.user}/{body.get('name')}"
        with self._lock:
            if self._repos.pop((repo_type, repo_id), None) is None:
                raise _HttpError(404, f"Repository not found: {repo_id}", "RepoNotFound")
            (self.root / "repos" / f"{repo_type}s" / f"{repo_id}.json").unlink(missing_ok=True)
        return {}

    def _info(self, repo: _Repo, oid: str, blobs: bool) -> dict[str, Any]:
        commit = repo.commits[oid]
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry["size"], blobId=entry["git_oid"])
                if entry["lfs"]:
                    pointer = len(lfs_pointer(entry["sha256"], entry["size"]))
                    sibling["lfs"] = {"sha256": entry["sha256"], "size": entry["size"], "pointerSize": pointer}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0], "sha": oid, "lastModified": commit["date"],
            "createdAt": repo.created_at, "private": repo.private, "disabled": False, "gated": False,
            "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            "usedStorage": sum(e["size"] for e in commit["files"].values()),
        }  # fmt: skip
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return info

    def _tree(self, repo: _Repo, oid: str, folder: str, recursive: bool, expand: bool) -> list[dict[str, Any]]:
        files = repo.commits[oid]["files"]
        folder = folder.strip("/")
        prefix = folder + "/" if folder else ""
        if folder in files:
            raise _HttpError(404, f"{folder} is a file, not a folder", "EntryNotFound")
        under = sorted(p for p in files if p.startswith(prefix))
        if folder and not under:
            raise _HttpError(404, f"Entry not found: {folder}", "EntryNotFound")
        folders: set[str] = set()
        shown: list[str] = []
        for path in under:
            parts = path[len(prefix) :].split("/")
            depth = len(parts) - 1 if recursive else min(1, len(parts) - 1)
            folders.update(prefix + "/".join(parts[: i + 1]) for i in range(depth))
            if recursive or len(parts) == 1:
                shown.append(path)
        entries: list[dict[str, Any]] = []
        for path in sorted(folders):
            listing = "\n".join(f"{p} {files[p]['git_oid']}" for p in under if p.startswith(path + "/"))
            entries.append({"type": "directory", "oid": git_blob_oid(listing.encode()), "size": 0, "path": path})
        for path in shown:
            entry = files[path]
            item: dict[str, Any] = {"type": "file", "oid": entry["git_oid"], "size": entry["size"], "path": path}
            if entry["lfs"]:
                pointer = len(lfs_pointer(entry["sha256"], entry["size"]))
                item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer}
            entries.append(item)
        if expand:
            for item in entries:
                item["lastCommit"] = self._last_commit(repo, oid, item["path"])
        return entries

    def _refs(self, repo: _Repo, include_prs: bool) -> dict[str, Any]:
        def ref(kind: str, name: str, oid: str) -> dict[str, str]:
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}

        out: dict[str, Any] = {
            "branches": [ref("heads", n, o) for n, o in sorted(repo.branches.items())],
            "converts": [],
            "tags": [ref("tags", n, o) for n, o in sorted(repo.tags.items())],
        }
        if include_prs:
            out["pullRequests"] = []
        return out

    def _commits(self, repo: _Repo, oid: str | None) -> list[dict[str, Any]]:
        out = []
        while oid is not None:
            commit = repo.commits[oid]
            out.append({
                "id": oid, "title": commit["message"], "message": commit["description"],
                "authors": [{"user": self.user}], "date": commit["date"],
            })  # fmt: skip
            oid = commit["parent"]
        return out

    def _preupload(self, repo: _Repo, revision: str, body: dict[str, Any]) -> dict[str, Any]:
        head = repo.branches[self._branch(repo, revision)]
        files = repo.commits[head]["files"]
        patterns = self._lfs_patterns(files)
        answer = []
        for item in body.get("files", []):
            path, size = item["path"], int(item["size"])
            mode = self._upload_mode(patterns, path, size, base64.b64decode(item.get("sample", "")))
            existing = files.get(path)
            oid = None if existing is None else existing["sha256"] if existing["lfs"] else existing["git_oid"]
            answer.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return {"files": answer, "commitOid": head}

    def _lfs_batch(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("operation") != "upload":
            raise _HttpError(400, "Only the 'upload' LFS batch operation is supported")
        objects = []
        for item in body.get("objects", []):
            oid, size = item.get("oid"), item.get("size")
            if not isinstance(oid, str) or not _SHA256.match(oid) or not isinstance(size, int) or size < 0:
                error = {"code": 422, "message": "oid must be a sha256 and size an integer"}
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else -1, "error": error})
                continue
            if self._has_object(oid, size):
                objects.append({"oid": oid, "size": size})  # already stored: no actions, the client skips it
                continue
            ticket = secrets.token_hex(16)
            with self._lock:
                self._tickets[ticket] = (oid, size)
            objects.append({
                "oid": oid, "size": size, "authenticated": True,
                "actions": {
                    "upload": {"href": f"{self.url}/lfs-upload/{oid}?ticket={ticket}", "header": {}},
                    "verify": {"href": f"{self.url}/lfs-verify/{oid}?ticket={ticket}", "header": {}},
                },
            })  # fmt: skip
        return {"transfer": "basic", "objects": objects}

    def _commit(self, repo: _Repo, revision: str, lines: list[dict[str, Any]]) -> dict[str, Any]:
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "The first NDJSON line of a commit must be its header")
        header = lines[0].get("value") or {}
        # Content is stored before taking the lock; a failed commit leaves unreferenced objects (harmless).
        ops: list[tuple[str, str, dict[str, Any] | None]] = []  # (key, path, file entry)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = value.get("path")
            if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
                raise _HttpError(400, f"Invalid path in commit operation: {path!r}")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HttpError(400, f"Unsupported encoding {value.get('encoding')!r}")
                content = base64.b64decode(value.get("content", ""))
                sha = self._store_bytes(content)
                ops.append((key, path, _file_entry(sha, len(content), lfs=False, content=content)))
            elif key == "lfsFile":
                oid = value.get("oid", "")
                stored = self._object_path(oid) if _SHA256.match(oid) else None
                if stored is None or not stored.is_file():
                    raise _HttpError(400, f"LFS object {oid} for {path} was never uploaded")
                size = stored.stat().st_size
                if value.get("size", size) != size:
                    raise _HttpError(400, f"LFS object {oid} for {path} has {size} bytes, not {value.get('size')}")
                ops.append((key, path, _file_entry(oid, size, lfs=True)))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append((key, path.rstrip("/"), None))
            else:
                raise _HttpError(400, f"Unknown commit operation {key!r}")
        with self._lock:
            branch = self._branch(repo, revision)
            head = repo.branches[branch]
            parent_commit = header.get("parentCommit")
            if parent_commit and not head.startswith(parent_commit):
                raise _HttpError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[head]["files"])
            for key, path, entry in ops:
                if key == "deletedFile" or key == "deletedFolder":
                    gone = [p for p in files if (p == path if key == "deletedFile" else p.startswith(path + "/"))]
                    if not gone:
                        raise _HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    for p in gone:
                        del files[p]
                else:
                    files[path] = entry
            oid = self._new_commit(repo, head, files, header.get("summary") or "", header.get("description") or "")
            repo.branches[branch] = oid
            self._save(repo)
        url = f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{oid}"
        return {"success": True, "commitOid": oid, "commitUrl": url, "pullRequestUrl": None}


# ------------------------------------------------------------------------------ HTTP layer


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    hub: HubServer

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-answer are normal (faults, retries); anything else is recorded.
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, TimeoutError, _Dropped)):
            self.hub.errors.append(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer has a Content-Length
    disable_nagle_algorithm = True  # headers and body go out in two writes: without this, +40 ms a request
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # silent by default
        pass

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # -- request body (always consumed, even when answering with an error)

    def _read_body(self) -> Iterator[bytes]:
        """The request body, chunk by chunk; one iterator per request (see ``_body_chunks``)."""
        if self.command == "HEAD":
            return
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                left = size
                while left:
                    chunk = self.rfile.read(min(left, _CHUNK))
                    if not chunk:
                        raise ConnectionError("client closed the connection mid-body")
                    left -= len(chunk)
                    yield chunk
                self.rfile.readline()  # CRLF after each chunk
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                chunk = self.rfile.read(min(left, _CHUNK))
                if not chunk:
                    raise ConnectionError("client closed the connection mid-body")
                left -= len(chunk)
                yield chunk

    def _body_chunks(self) -> Iterator[bytes]:
        """What is left of the body: a reader that stopped early and a later drain share one iterator."""
        return self._body_iter

    def _body(self) -> bytes:
        return b"".join(self._body_chunks())

    def _json_body(self) -> dict[str, Any]:
        raw = self._body()
        try:
            return json.loads(raw or b"{}")
        except ValueError as exc:
            raise _HttpError(400, f"Request body is not JSON: {exc}") from exc

    def _drain(self) -> None:
        for _ in self._body_chunks():
            pass

    # -- answers

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, content_type: str = _JSON) -> None:
        self._drain()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None, content_type: str = _JSON) -> None:
        self._send(status, json.dumps(obj).encode(), headers, content_type)

    def _drop(self) -> None:
        """Close the connection abruptly, without an answer."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        raise _Dropped()

    # -- dispatch

    def _handle(self) -> None:
        hub = self.server.hub
        self._body_iter = self._read_body()
        split = urlsplit(self.path)
        hub._log(self.command, unquote(split.path))
        try:
            self._route(hub, [unquote(p) for p in split.path.split("/")[1:]], parse_qs(split.query))
        except _Dropped:
            return
        except _HttpError as err:
            # Header values must be latin-1: escape the rest (paths may be any unicode).
            message = err.message.replace("\n", " ")[:500].encode("ascii", "backslashreplace").decode()
            headers = {"X-Error-Message": message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json(err.status, {"error": err.message, **err.body}, headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as exc:
            hub.errors.append(traceback.format_exc())
            with contextlib.suppress(Exception):
                self._json(500, {"error": f"test Hub server error: {exc!r}"})
            self.close_connection = True

    def _route(self, hub: HubServer, parts: list[str], query: dict[str, list[str]]) -> None:
        method = self.command
        if parts[:1] == ["api"]:
            return self._route_api(hub, method, parts[1:], query)
        if parts[:1] == ["lfs-upload"] and len(parts) == 2 and method == "PUT":
            return self._lfs_upload(hub, parts[1], query.get("ticket", [""])[0])
        if parts[:1] == ["lfs-verify"] and len(parts) == 2 and method == "POST":
            body = self._json_body()
            hub._require_auth(self)
            oid, size = body.get("oid", ""), body.get("size", -1)
            if oid != parts[1] or not _SHA256.match(oid) or not hub._has_object(oid, size):
                raise _HttpError(404, f"LFS object {oid} ({size} bytes) is not stored")
            return self._json(200, {})
        repo_type = _PLURAL_TO_TYPE.get(parts[0], "model") if parts[0] in ("datasets", "spaces") else "model"
        if repo_type != "model":
            parts = parts[1:]
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            if method != "POST":
                raise _HttpError(405, "Use POST")
            body = self._json_body()
            with hub._lock:
                hub._writable(self, repo_type, f"{parts[0]}/{parts[1][:-4]}")
            return self._json(200, hub._lfs_batch(body), content_type="application/vnd.git-lfs+json")
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._serve_file(hub, repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise _HttpError(404, f"Not found: {method} {self.path}")

    def _route_api(self, hub: HubServer, method: str, parts: list[str], query: dict[str, list[str]]) -> None:
        def flag(name: str) -> bool:
            return query.get(name, ["false"])[0].lower() in ("1", "true")

        if parts == ["whoami-v2"] and method == "GET":
            return self._json(200, hub._whoami(self))
        if parts == ["validate-yaml"] and method == "POST":
            self._json_body()
            return self._json(200, {"errors": [], "warnings": []})
        if parts == ["repos", "create"] and method == "POST":
            return self._json(*hub._create_repo(self, self._json_body()))
        if parts == ["repos", "delete"] and method == "DELETE":
            return self._json(200, hub._delete_repo(self, self._json_body()))
        if len(parts) < 3 or parts[0] not in _PLURAL_TO_TYPE:
            raise _HttpError(404, f"Not found: {method} {self.path}")
        repo_type, repo_id, rest = _PLURAL_TO_TYPE[parts[0]], f"{parts[1]}/{parts[2]}", parts[3:]
        action, arg = (rest[0], "/".join(rest[1:])) if rest else ("", "")
        json_body = method in ("POST", "PUT", "DELETE") and action not in ("commit", "paths-info")  # NDJSON, form
        body = self._json_body() if json_body else None

        if method == "GET" and action in ("", "revision"):
            with hub._lock:
                repo = hub._readable(self, repo_type, repo_id)
                oid = hub._resolve(repo, arg if action else "main")
                return self._json(200, hub._info(repo, oid, flag("blobs")))
        if method == "GET" and action == "tree" and rest[1:]:
            with hub._lock:
                repo = hub._readable(self, repo_type, repo_id)
                oid = hub._resolve(repo, rest[1])
                return self._json(200, hub._tree(repo, oid, "/".join(rest[2:]), flag("recursive"), flag("expand")))
        if method == "GET" and action == "refs":
            with hub._lock:
                return self._json(200, hub._refs(hub._readable(self, repo_type, repo_id), flag("include_prs")))
        if method == "GET" and action == "commits":
            with hub._lock:
                repo = hub._readable(self, repo_type, repo_id)
                return self._json(200, hub._commits(repo, hub._resolve(repo, arg or "main")))
        if method == "POST" and action == "paths-info":
            form = parse_qs(self._body().decode())
            wanted = [p.strip("/") for p in form.get("paths", [])]
            expand = form.get("expand", ["false"])[0].lower() == "true"
            with hub._lock:
                repo = hub._readable(self, repo_type, repo_id)
                entries = {e["path"]: e for e in hub._tree(repo, hub._resolve(repo, arg), "", True, expand)}
            return self._json(200, [entries[p] for p in wanted if p in entries])  # in the order asked
        if method == "POST" and action == "preupload":
            if flag("create_pr"):
                raise _HttpError(400, "Pull requests are not supported by the test Hub")
            with hub._lock:
                return self._json(200, hub._preupload(hub._writable(self, repo_type, repo_id), arg, body or {}))
        if method == "POST" and action == "commit":
            return self._commit(hub, repo_type, repo_id, arg, query)
        if action == "tag" and method in ("POST", "DELETE"):
            with hub._lock:
                repo = hub._writable(self, repo_type, repo_id)
                if method == "DELETE":
                    if repo.tags.pop(arg, None) is None:
                        raise _HttpError(404, f"Invalid rev id: {arg}", "RevisionNotFound")
                else:
                    tag = (body or {}).get("tag", "")
                    oid = hub._resolve(repo, arg)
                    if tag in repo.tags or tag in repo.branches:
                        raise _HttpError(409, f"Tag {tag} already exists")
                    if not tag or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$", tag):
                        raise _HttpError(400, f"Invalid tag name {tag!r}")
                    repo.tags[tag] = oid
                hub._save(repo)
            return self._json(200, {})
        if action == "branch" and method in ("POST", "DELETE"):
            with hub._lock:
                repo = hub._writable(self, repo_type, repo_id)
                if method == "DELETE":
                    if arg == "main":
                        raise _HttpError(403, "Cannot delete the default branch")
                    if repo.branches.pop(arg, None) is None:
                        raise _HttpError(404, f"Invalid rev id: {arg}", "RevisionNotFound")
                else:
                    if arg in repo.branches or arg in repo.tags:
                        raise _HttpError(409, f"Reference {arg} already exists")
                    if not arg or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$", arg) or arg.startswith("refs/"):
                        raise _HttpError(400, f"Invalid branch name {arg!r}")
                    repo.branches[arg] = hub._resolve(repo, (body or {}).get("startingPoint") or "main")
                hub._save(repo)
            return self._json(200, {})
        raise _HttpError(404, f"Not found: {method} {self.path}")

    def _commit(self, hub: HubServer, repo_type: str, repo_id: str, revision: str, query: dict[str, Any]) -> None:
        raw = self._body()
        if hub._take_fault("drop_commit"):
            self._drop()
        if query.get("create_pr", ["0"])[0] not in ("0", "false"):
            raise _HttpError(400, "Pull requests are not supported by the test Hub")
        try:
            lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except ValueError as exc:
            raise _HttpError(400, f"Commit body is not NDJSON: {exc}") from exc
        with hub._lock:
            repo = hub._writable(self, repo_type, repo_id)
        self._json(200, hub._commit(repo, revision, lines))

    def _lfs_upload(self, hub: HubServer, oid: str, ticket: str) -> None:
        after = hub._take_fault("drop_upload")
        if after is not None:
            received = 0
            for chunk in self._body_chunks():
                received += len(chunk)
                if received >= after:
                    break
            self._drop()
        status = hub._take_fault("reject_upload")
        if status is not None:
            raise _HttpError(status, f"Upload rejected (injected fault, HTTP {status})")
        with hub._lock:
            expected = hub._tickets.get(ticket)
        if expected is None or expected[0] != oid:
            raise _HttpError(403, "Unknown or expired upload URL")
        sha, size = hashlib.sha256(), 0
        with tempfile.NamedTemporaryFile(dir=hub.root / "tmp", delete=False) as tmp:
            for chunk in self._body_chunks():
                sha.update(chunk)
                size += len(chunk)
                tmp.write(chunk)
        tmp_path = Path(tmp.name)
        if (sha.hexdigest(), size) != expected:
            tmp_path.unlink()
            got = f"sha256 {sha.hexdigest()} and {size} bytes"
            raise _HttpError(400, f"Uploaded body has {got}, expected {oid} and {expected[1]} bytes")
        target = hub._object_path(oid)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_path.replace(target)
        self._send(200, b"", {"ETag": f'"{oid}"'}, content_type="text/plain")

    def _serve_file(self, hub: HubServer, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        with hub._lock:
            repo = hub._readable(self, repo_type, repo_id)
            oid = hub._resolve(repo, revision)
            entry = repo.commits[oid]["files"].get(path)
            if entry is None:
                raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": oid})
            entry = dict(entry)
        etag = f'"{entry["sha256"] if entry["lfs"] else entry["git_oid"]}"'
        headers = {"X-Repo-Commit": oid, "ETag": etag, "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(entry["size"])})
        if self.command == "HEAD":
            # Metadata only, from the commit record (so a tampered file still answers as committed).
            self.send_response(200)
            for key, value in {"Content-Type": "application/octet-stream", **headers}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(entry["size"]))
            self.end_headers()
            return
        blob = hub._object_path(entry.get("stored", entry["sha256"]))
        total = blob.stat().st_size
        start, end, status = 0, total - 1, 200
        wanted = self.headers.get("Range")
        if wanted:
            match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", wanted)
            if match is None or match.groups() == ("", ""):
                raise _HttpError(416, f"Unsupported Range {wanted!r}", headers={"Content-Range": f"bytes */{total}"})
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last), total - 1) if last else total - 1
            else:
                start = max(total - int(last), 0)
            if start >= total or start > end:
                unsatisfiable = {"Content-Range": f"bytes */{total}"}
                raise _HttpError(416, f"Range {wanted!r} outside {total} bytes", headers=unsatisfiable)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        drop_after = hub._take_fault("drop_download")
        self.send_response(status)
        for key, value in {"Content-Type": "application/octet-stream", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        left = end - start + 1 if drop_after is None else min(drop_after, end - start + 1)
        with blob.open("rb") as fh:
            fh.seek(start)
            while left:
                chunk = fh.read(min(left, _CHUNK))
                self.wfile.write(chunk)
                left -= len(chunk)
        if drop_after is not None:
            self._drop()


# ------------------------------------------------------------------------------ client settings, fixture


@contextlib.contextmanager
def hub_client_settings(*, offline: bool = False) -> Iterator[None]:
    """Set huggingface_hub's run-time switches for a loopback Hub; restore them on exit.

    Xet off, telemetry off (no request to huggingface.co), offline mode as given.  Nest
    ``with hub_client_settings(offline=True):`` inside a test to simulate losing the network.
    """
    from huggingface_hub import constants

    names = ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_TELEMETRY")
    saved = {name: getattr(constants, name) for name in names}
    constants.HF_HUB_OFFLINE = offline
    constants.HF_HUB_DISABLE_XET = True
    constants.HF_HUB_DISABLE_TELEMETRY = True
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(constants, name, value)


@pytest.fixture
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A started :class:`HubServer` on a fresh root, with the client switched to talk to it.

    ``hub.url`` is the endpoint, ``hub.token`` a write token; stopped after the test.
    """
    with hub_client_settings():
        server = HubServer(tmp_path_factory.mktemp("hub")).start()
        try:
            yield server
        finally:
            server.stop()
    if server.errors:
        pytest.fail("test Hub server errors (answered 500):\n" + "\n".join(server.errors), pytrace=False)
