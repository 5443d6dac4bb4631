"""tests/hub_server.py: the loopback Hub, driven by the real huggingface_hub client.

Every test talks HTTP to a fresh :class:`HubServer` on 127.0.0.1 through the public client
API (``HfApi``, ``snapshot_download``, ``hf_hub_download``) with nothing patched but the
client's run-time switches (``hub_client_settings``: Xet off, telemetry off, online).
"""

from __future__ import annotations

import hashlib
import http.client
import json
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hub_server import DEFAULT_GITATTRIBUTES, HubServer, git_blob_oid, hub_client_settings

REPO = "tester/demo"
WEIGHTS = bytes(range(256)) * 20  # 5120 bytes, has NUL bytes; LFS by its suffix anyway
README = "---\nlicense: apache-2.0\n---\n# demo\n"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _make_folder(root: Path) -> Path:
    (root / "maps").mkdir(parents=True, exist_ok=True)
    (root / "model.safetensors").write_bytes(WEIGHTS)
    (root / "README.md").write_text(README)
    (root / "config.json").write_text('{"hidden": 64}\n')
    (root / "maps" / "kept.json").write_text("[0, 2, 3]\n")
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _published(hub: HubServer, tmp_path: Path) -> tuple[HfApi, Path, str]:
    """Create ``REPO`` and upload a fresh folder to it; return the api, the folder, the commit oid."""
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo(REPO)
    folder = _make_folder(tmp_path / "folder")
    return api, folder, api.upload_folder(repo_id=REPO, folder_path=folder).oid


def _puts(hub: HubServer, since: int = 0) -> list[str]:
    """LFS object ids PUT since request number ``since``."""
    return [path.rsplit("/", 1)[1] for method, path in hub.requests[since:] if method == "PUT"]


def _commit_posts(hub: HubServer, since: int = 0) -> int:
    return sum(1 for method, path in hub.requests[since:] if method == "POST" and "/commit/" in path)


class _Answer:
    """Status, headers and body of one raw HTTP exchange."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body


def _raw(hub: HubServer, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> _Answer:
    """One request on a fresh connection, below the client (http.client)."""
    conn = http.client.HTTPConnection("127.0.0.1", int(hub.url.rsplit(":", 1)[1]), timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return _Answer(resp.status, dict(resp.headers), resp.read())
    finally:
        conn.close()


# ----------------------------------------------------------------------------- repos, upload


def test_whoami_and_create_repo_twice(hub: HubServer) -> None:
    api = HfApi(endpoint=hub.url, token=hub.token)
    assert api.whoami()["name"] == "tester"

    url = api.create_repo("demo")  # no namespace: the token's user
    assert (url.repo_id, url.endpoint) == (REPO, hub.url)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True) == url

    # Like the Hub: a new repo has one commit holding the default .gitattributes.
    info = api.model_info(REPO)
    assert (info.id, info.private, info.sha) == (REPO, False, hub.head(REPO))
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]
    assert hub.commit(REPO)["parent"] is None


def test_upload_folder_routes_lfs_and_regular_files(hub: HubServer, tmp_path: Path) -> None:
    api, folder, oid = _published(hub, tmp_path)

    assert oid == hub.head(REPO)
    calls = [(m, p) for m, p in hub.requests if not p.startswith("/api/repos/")]
    assert calls == [
        ("POST", "/api/validate-yaml"),  # upload_folder and create_commit each validate README.md
        ("POST", "/api/validate-yaml"),
        ("POST", f"/api/models/{REPO}/preupload/main"),
        ("POST", f"/{REPO}.git/info/lfs/objects/batch"),
        ("PUT", f"/lfs-upload/{_sha256(WEIGHTS)}"),
        ("POST", f"/lfs-verify/{_sha256(WEIGHTS)}"),
        ("POST", f"/api/models/{REPO}/commit/main"),
    ]
    files = hub.commit(REPO)["files"]
    assert {p: e["lfs"] for p, e in files.items()} == {
        ".gitattributes": False, "README.md": False, "config.json": False,
        "maps/kept.json": False, "model.safetensors": True,
    }  # fmt: skip
    for path, data in _files(folder).items():
        assert (files[path]["sha256"], files[path]["size"]) == (_sha256(data), len(data))
    assert files["config.json"]["git_oid"] == git_blob_oid((folder / "config.json").read_bytes())

    info = api.model_info(REPO, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings}
    weights = siblings["model.safetensors"]
    assert (weights.size, weights.lfs.sha256, weights.lfs.size) == (len(WEIGHTS), _sha256(WEIGHTS), len(WEIGHTS))
    assert weights.lfs.pointer_size == 129
    assert siblings["README.md"].lfs is None
    assert siblings["README.md"].blob_id == git_blob_oid(README.encode())
    assert info.last_modified is not None and info.sha == oid
    assert hub.errors == []


def test_upload_mode_follows_gitattributes_size_and_binary_sample(tmp_path: Path) -> None:
    with hub_client_settings(), HubServer(tmp_path / "hub", lfs_threshold=1000) as hub:
        api = HfApi(endpoint=hub.url, token=hub.token)
        api.create_repo(REPO)
        folder = tmp_path / "folder"
        folder.mkdir()
        (folder / "big.json").write_text("[" + "0," * 600 + "0]")  # >= 1000 bytes
        (folder / "small.json").write_text("[0]")
        (folder / "index.dat").write_bytes(b"\x00\x01\x02")  # NUL in the sample: binary
        (folder / "tiny.bin").write_bytes(b"abc")  # *.bin in .gitattributes
        api.upload_folder(repo_id=REPO, folder_path=folder)
        lfs = {p: e["lfs"] for p, e in hub.commit(REPO)["files"].items() if p != ".gitattributes"}
        assert lfs == {"big.json": True, "small.json": False, "index.dat": True, "tiny.bin": True}


def test_second_upload_commits_on_top_and_skips_unchanged_files(hub: HubServer, tmp_path: Path) -> None:
    api, folder, first = _published(hub, tmp_path)

    (folder / "config.json").write_text('{"hidden": 128}\n')
    start = len(hub.requests)
    second = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="bigger").oid
    assert second != first and hub.head(REPO) == second
    commit = hub.commit(REPO)
    assert (commit["parent"], commit["message"]) == (first, "bigger")
    assert commit["files"]["config.json"]["sha256"] == _sha256(b'{"hidden": 128}\n')
    # The weights did not change: the client still asks the LFS batch API, which answers
    # "already stored", so nothing is PUT; preupload returned their oid, so the commit skips them.
    assert _puts(hub, start) == []

    # Nothing changed: the client sends no commit at all and returns the current head.
    start = len(hub.requests)
    assert api.upload_folder(repo_id=REPO, folder_path=folder).oid == second
    assert _commit_posts(hub, start) == 0 and hub.head(REPO) == second


def test_delete_and_stale_parent_commit(hub: HubServer, tmp_path: Path) -> None:
    api, folder, first = _published(hub, tmp_path)

    api.create_commit(REPO, [CommitOperationDelete("maps/")], commit_message="drop maps", parent_commit=first)
    assert "maps/kept.json" not in hub.commit(REPO)["files"]
    with pytest.raises(HfHubHTTPError) as err:  # main moved on since `first`
        api.create_commit(REPO, [CommitOperationAdd("x.txt", b"x")], commit_message="x", parent_commit=first)
    assert err.value.response.status_code == 412
    with pytest.raises(EntryNotFoundError):
        api.create_commit(REPO, [CommitOperationDelete("nope.txt")], commit_message="y")


def test_empty_commit_request_makes_an_empty_commit(hub: HubServer) -> None:
    # The client never sends one (create_commit returns early); the Hub, like git, accepts it.
    HfApi(endpoint=hub.url, token=hub.token).create_repo(REPO)
    before = hub.commit(REPO)
    body = json.dumps({"key": "header", "value": {"summary": "empty"}}).encode()
    answer = _raw(hub, "POST", f"/api/models/{REPO}/commit/main", body, {"Authorization": f"Bearer {hub.token}"})
    assert answer.status == 200
    after = hub.commit(REPO)
    assert json.loads(answer.body)["commitOid"] == after["oid"]
    assert (after["parent"], after["files"]) == (before["oid"], before["files"])


# ----------------------------------------------------------------------------- download


def test_snapshot_download_gives_identical_bytes(hub: HubServer, tmp_path: Path) -> None:
    _, folder, oid = _published(hub, tmp_path)

    snap = Path(snapshot_download(REPO, endpoint=hub.url, cache_dir=tmp_path / "cache"))
    assert snap.name == oid
    assert _files(snap) == {".gitattributes": DEFAULT_GITATTRIBUTES.encode(), **_files(folder)}

    only = Path(snapshot_download(REPO, endpoint=hub.url, cache_dir=tmp_path / "c2", allow_patterns=["*.json"]))
    assert sorted(_files(only)) == ["config.json", "maps/kept.json"]


def test_hf_hub_download_by_branch_tag_and_commit(hub: HubServer, tmp_path: Path) -> None:
    api, folder, first = _published(hub, tmp_path)
    api.create_tag(REPO, tag="v1")
    new_weights = WEIGHTS[::-1]
    (folder / "model.safetensors").write_bytes(new_weights)
    second = api.upload_folder(repo_id=REPO, folder_path=folder).oid
    api.create_branch(REPO, branch="old", revision=first)

    def get(revision: str | None, cache: str) -> bytes:
        cache_dir = tmp_path / cache
        path = hf_hub_download(REPO, "model.safetensors", revision=revision, endpoint=hub.url, cache_dir=cache_dir)
        return Path(path).read_bytes()

    assert get(None, "c") == new_weights
    assert get("v1", "c") == WEIGHTS
    assert get(first, "c") == WEIGHTS
    assert get(second, "c") == new_weights
    assert get("old", "c") == WEIGHTS
    assert get(first[:7], "c2") == WEIGHTS  # a short oid resolves too
    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second, "old": first}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": first}
    assert [c.commit_id for c in api.list_repo_commits(REPO)] == [second, first, hub.commit(REPO, first)["parent"]]

    # Upload to a branch that exists; a missing branch is RevisionNotFound (create it first).
    api.upload_file(path_or_fileobj=b"on old", path_in_repo="note.txt", repo_id=REPO, revision="old")
    assert "note.txt" in hub.commit(REPO, "old")["files"] and "note.txt" not in hub.commit(REPO)["files"]
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO, revision="nope")
    api.create_branch(REPO, branch="exp/a", revision="v1")  # a "/" in a ref name
    assert get("exp/a", "c3") == WEIGHTS

    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag(REPO, tag="v1")
    assert err.value.response.status_code == 409
    api.create_tag(REPO, tag="v1", exist_ok=True)
    api.delete_tag(REPO, tag="v1")
    with pytest.raises(RevisionNotFoundError):
        api.delete_tag(REPO, tag="v1")
    api.delete_branch(REPO, branch="exp/a")
    assert {b.name for b in api.list_repo_refs(REPO).branches} == {"main", "old"}


def test_file_metadata_headers(hub: HubServer, tmp_path: Path) -> None:
    _, folder, oid = _published(hub, tmp_path)

    lfs = get_hf_file_metadata(hf_hub_url(REPO, "model.safetensors", endpoint=hub.url))
    assert (lfs.commit_hash, lfs.etag, lfs.size, lfs.xet_file_data) == (oid, _sha256(WEIGHTS), len(WEIGHTS), None)
    regular = get_hf_file_metadata(hf_hub_url(REPO, "maps/kept.json", endpoint=hub.url))
    assert regular.etag == git_blob_oid(b"[0, 2, 3]\n")

    head = _raw(hub, "HEAD", f"/{REPO}/resolve/main/model.safetensors")
    assert head.headers["X-Linked-Etag"] == f'"{_sha256(WEIGHTS)}"'
    assert head.headers["X-Linked-Size"] == str(len(WEIGHTS))
    assert not [h for h in head.headers if h.lower().startswith("x-xet") or h.lower() == "link"]


def test_range_requests(hub: HubServer, tmp_path: Path) -> None:
    _published(hub, tmp_path)
    path = f"/{REPO}/resolve/main/model.safetensors"

    part = _raw(hub, "GET", path, headers={"Range": "bytes=10-19"})
    assert (part.status, part.body) == (206, WEIGHTS[10:20])
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(WEIGHTS)}"
    assert _raw(hub, "GET", path, headers={"Range": "bytes=5000-"}).body == WEIGHTS[5000:]
    assert _raw(hub, "GET", path, headers={"Range": "bytes=-7"}).body == WEIGHTS[-7:]
    assert _raw(hub, "GET", path, headers={"Range": f"bytes={len(WEIGHTS)}-"}).status == 416


def test_list_repo_tree(hub: HubServer, tmp_path: Path) -> None:
    api, _, oid = _published(hub, tmp_path)

    top = {e.path: type(e).__name__ for e in api.list_repo_tree(REPO)}
    assert top == {
        ".gitattributes": "RepoFile", "README.md": "RepoFile", "config.json": "RepoFile",
        "maps": "RepoFolder", "model.safetensors": "RepoFile",
    }  # fmt: skip
    every = {e.path: e for e in api.list_repo_tree(REPO, recursive=True)}
    assert set(every) == set(top) | {"maps/kept.json"}
    assert every["model.safetensors"].lfs.sha256 == _sha256(WEIGHTS)
    assert [e.path for e in api.list_repo_tree(REPO, path_in_repo="maps")] == ["maps/kept.json"]
    assert api.list_repo_files(REPO) == sorted(set(top) - {"maps"} | {"maps/kept.json"})
    expanded = {e.path: e for e in api.list_repo_tree(REPO, expand=True)}
    assert expanded["config.json"].last_commit.oid == oid
    assert expanded[".gitattributes"].last_commit.oid == hub.commit(REPO)["parent"]
    assert [p.path for p in api.get_paths_info(REPO, ["config.json", "maps", "nope"])] == ["config.json", "maps"]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, path_in_repo="nope"))


def test_dataset_repo(hub: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo("tester/data", repo_type="dataset")
    csv = b"a,b\n1,2\n"
    api.upload_file(path_or_fileobj=csv, path_in_repo="train.csv", repo_id="tester/data", repo_type="dataset")
    snap = snapshot_download("tester/data", repo_type="dataset", endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert (Path(snap) / "train.csv").read_bytes() == csv
    assert api.dataset_info("tester/data").sha == hub.head("tester/data", repo_type="dataset")


# ----------------------------------------------------------------------------- auth and errors


def test_writes_need_the_token(hub: HubServer, tmp_path: Path) -> None:
    api, folder, oid = _published(hub, tmp_path)
    for token in (False, "hf_wrong"):
        anonymous = HfApi(endpoint=hub.url, token=token)
        with pytest.raises(HfHubHTTPError) as err:
            anonymous.create_repo("tester/other")
        assert err.value.response.status_code == 401
        (folder / "config.json").write_text(f'{{"token": "{token}"}}')
        with pytest.raises(HfHubHTTPError) as err:
            anonymous.upload_folder(repo_id=REPO, folder_path=folder)
        assert err.value.response.status_code == 401
        assert hub.head(REPO) == oid  # no commit was made
    # Reads of a public repo need no token.
    assert HfApi(endpoint=hub.url, token=False).model_info(REPO).sha == oid


def test_private_repo_reads_need_the_token(hub: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo(REPO, private=True)
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=REPO)
    assert api.model_info(REPO).private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "s.txt", endpoint=hub.url, cache_dir=tmp_path / "c", token=False)
    path = hf_hub_download(REPO, "s.txt", endpoint=hub.url, cache_dir=tmp_path / "c", token=hub.token)
    assert Path(path).read_bytes() == b"secret"


def test_not_found_kinds(hub: HubServer, tmp_path: Path) -> None:
    api, _, _ = _published(hub, tmp_path)
    cache = tmp_path / "cache"

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/nope")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/nope", "config.json", endpoint=hub.url, cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("tester/nope", endpoint=hub.url, cache_dir=cache)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.json", endpoint=hub.url, cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="nope", endpoint=hub.url, cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="v9", endpoint=hub.url, cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="0" * 40)
    assert not api.file_exists(REPO, "nope.json") and api.file_exists(REPO, "config.json")
    assert not api.repo_exists("tester/nope") and not api.revision_exists(REPO, "v9")


def test_server_reads_error_bodies_and_keeps_the_connection(hub: HubServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", int(hub.url.rsplit(":", 1)[1]), timeout=5)
    conn.request("POST", "/api/repos/create", body=b'{"name": "x", "pad": "' + b"p" * 300_000 + b'"}')
    first = conn.getresponse()
    assert (first.status, json.loads(first.read())["error"]) == (401, first.headers["X-Error-Message"])
    sock = conn.sock
    conn.request("GET", f"/api/models/{REPO}")  # same keep-alive connection
    second = conn.getresponse()
    assert (second.status, second.headers["X-Error-Code"]) == (404, "RepoNotFound")
    second.read()
    chunks = [b'{"content": "', b"x" * 70_000, b'"}']  # a chunked body (the client itself sends Content-Length)
    conn.request("POST", "/api/validate-yaml", body=iter(chunks), encode_chunked=True)
    third = conn.getresponse()
    assert (third.status, json.loads(third.read())) == (200, {"errors": [], "warnings": []})
    conn.request("GET", "/api/whoami-v2", headers={"Authorization": f"Bearer {hub.token}"})
    assert json.loads(conn.getresponse().read())["name"] == "tester"
    assert conn.sock is sock
    conn.close()


# ----------------------------------------------------------------------------- faults


def test_dropped_upload_is_retried_by_the_client(hub: HubServer, tmp_path: Path) -> None:
    # huggingface_hub retries a PUT on a dropped connection (1 s later): one drop only slows it.
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo(REPO)
    hub.drop_next_upload(after_bytes=1024)
    oid = api.upload_folder(repo_id=REPO, folder_path=_make_folder(tmp_path / "folder")).oid
    assert _puts(hub) == [_sha256(WEIGHTS)] * 2 and hub.head(REPO) == oid


def test_rejected_upload_raises_and_a_rerun_uploads_only_what_is_missing(hub: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo(REPO)
    folder = _make_folder(tmp_path / "folder")
    shards = {f"model-{i}.safetensors": bytes([i]) * (3000 + i) for i in range(3)}
    for name, data in shards.items():
        (folder / name).write_bytes(data)
    initial = hub.head(REPO)

    hub.reject_next_upload(status=403)  # 4xx: not retried by the client
    with pytest.raises(RuntimeError, match="Error while uploading") as err:
        api.upload_folder(repo_id=REPO, folder_path=folder)
    assert isinstance(err.value.__cause__, HfHubHTTPError) and err.value.__cause__.response.status_code == 403
    assert hub.head(REPO) == initial and _commit_posts(hub) == 0
    stored = {oid for oid in _puts(hub) if (hub.root / "objects" / oid[:2] / oid).is_file()}
    assert len(stored) == len(_puts(hub)) - 1  # the other PUTs of the batch went through

    start = len(hub.requests)
    api.upload_folder(repo_id=REPO, folder_path=folder)
    lfs_oids = {_sha256(d) for d in [WEIGHTS, *shards.values()]}
    assert set(_puts(hub, start)) == lfs_oids - stored and len(_puts(hub, start)) == len(lfs_oids) - len(stored)
    assert hub.commit(REPO)["files"]["model-2.safetensors"]["sha256"] == _sha256(shards["model-2.safetensors"])


def test_dropped_commit_raises_and_a_rerun_uploads_nothing_again(hub: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo(REPO)
    folder = _make_folder(tmp_path / "folder")
    initial = hub.head(REPO)

    hub.drop_next_commit()  # commits are not retried by the client
    with pytest.raises(httpx2.RemoteProtocolError):
        api.upload_folder(repo_id=REPO, folder_path=folder)
    assert hub.head(REPO) == initial and _puts(hub) == [_sha256(WEIGHTS)]

    start = len(hub.requests)
    oid = api.upload_folder(repo_id=REPO, folder_path=folder).oid
    assert _puts(hub, start) == [] and _commit_posts(hub, start) == 1 and hub.head(REPO) == oid


def test_interrupted_download_resumes(hub: HubServer, tmp_path: Path) -> None:
    _published(hub, tmp_path)
    hub.drop_next_download(after_bytes=1000)
    start = len(hub.requests)
    path = hf_hub_download(REPO, "model.safetensors", endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == WEIGHTS
    gets = [p for m, p in hub.requests[start:] if m == "GET"]
    assert gets == [f"/{REPO}/resolve/main/model.safetensors"] * 2  # the second with Range


def test_tamper_serves_other_bytes_under_the_recorded_metadata(hub: HubServer, tmp_path: Path) -> None:
    api, _, oid = _published(hub, tmp_path)
    early = hf_hub_download(REPO, "model.safetensors", endpoint=hub.url, cache_dir=tmp_path / "early")
    evil = bytes(len(WEIGHTS))  # same length: the client has no way to notice

    hub.tamper(REPO, "model.safetensors", evil)
    assert hub.commit(REPO)["files"]["model.safetensors"]["sha256"] == _sha256(WEIGHTS)  # metadata kept
    sibling = {s.rfilename: s for s in api.model_info(REPO, files_metadata=True).siblings}["model.safetensors"]
    assert sibling.lfs.sha256 == _sha256(WEIGHTS)
    fresh = hf_hub_download(REPO, "model.safetensors", endpoint=hub.url, cache_dir=tmp_path / "fresh")
    assert Path(fresh).read_bytes() == evil  # huggingface_hub does not hash what it downloads
    assert Path(fresh).resolve().name == _sha256(WEIGHTS)  # ...and files it under the recorded sha256
    # A cache that already holds the blob (same ETag) is not downloaded again.
    again = hf_hub_download(REPO, "model.safetensors", endpoint=hub.url, cache_dir=tmp_path / "early")
    assert again == early and Path(again).read_bytes() == WEIGHTS

    hub.tamper(REPO, "config.json", b"{}", revision=oid)  # other length: the client's size check fires
    with pytest.raises(OSError, match="Consistency check failed"):
        hf_hub_download(REPO, "config.json", endpoint=hub.url, cache_dir=tmp_path / "fresh")


def test_tamper_changes_one_commit_only(hub: HubServer, tmp_path: Path) -> None:
    api, folder, first = _published(hub, tmp_path)
    (folder / "config.json").write_text("{}\n")
    api.upload_folder(repo_id=REPO, folder_path=folder)  # the weights entry is unchanged in main

    hub.tamper(REPO, "model.safetensors", bytes(len(WEIGHTS)), revision=first)
    at_first = hf_hub_download(REPO, "model.safetensors", revision=first, endpoint=hub.url, cache_dir=tmp_path / "a")
    at_main = hf_hub_download(REPO, "model.safetensors", endpoint=hub.url, cache_dir=tmp_path / "b")
    assert (Path(at_first).read_bytes(), Path(at_main).read_bytes()) == (bytes(len(WEIGHTS)), WEIGHTS)


def test_paths_with_spaces_and_unicode(hub: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"ok", path_in_repo="sub dir/caf\u00e9 #1.json", repo_id=REPO)
    path = hf_hub_download(REPO, "sub dir/caf\u00e9 #1.json", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == b"ok"
    assert "sub dir/caf\u00e9 #1.json" in api.list_repo_files(REPO)
    with pytest.raises(EntryNotFoundError):  # the error message names a non-latin-1 path
        hf_hub_download(REPO, "sub dir/\u20ac.json", endpoint=hub.url, cache_dir=tmp_path / "c")


def test_offline_reads_from_the_cache(hub: HubServer, tmp_path: Path) -> None:
    _, folder, oid = _published(hub, tmp_path)
    cache = tmp_path / "cache"
    snap = snapshot_download(REPO, endpoint=hub.url, cache_dir=cache)
    hf_hub_download(REPO, "config.json", revision="main", endpoint=hub.url, cache_dir=cache)
    start = len(hub.requests)

    with hub_client_settings(offline=True):  # constants.HF_HUB_OFFLINE, read at every call
        assert snapshot_download(REPO, endpoint=hub.url, cache_dir=cache) == snap
        assert snapshot_download(REPO, revision=oid, endpoint=hub.url, cache_dir=cache) == snap
        path = hf_hub_download(REPO, "config.json", endpoint=hub.url, cache_dir=cache)
        assert Path(path).read_bytes() == (folder / "config.json").read_bytes()
        with pytest.raises(LocalEntryNotFoundError):
            snapshot_download(REPO, endpoint=hub.url, cache_dir=tmp_path / "empty")
        with pytest.raises(OfflineModeIsEnabled):
            HfApi(endpoint=hub.url).model_info(REPO)
    assert hub.requests[start:] == []
    # local_files_only=True does the same per call.
    assert snapshot_download(REPO, endpoint=hub.url, cache_dir=cache, local_files_only=True) == snap

    # With the server gone the client falls back to the cache by itself (no retry for cached files).
    hub.stop()
    assert snapshot_download(REPO, endpoint=hub.url, cache_dir=cache) == snap
    assert Path(hf_hub_download(REPO, "README.md", endpoint=hub.url, cache_dir=cache)).read_text() == README


def test_a_new_server_on_the_same_root_serves_the_same_repos(hub: HubServer, tmp_path: Path) -> None:
    _, _, oid = _published(hub, tmp_path)
    hub.stop()
    with HubServer(hub.root) as again:
        path = hf_hub_download(REPO, "model.safetensors", endpoint=again.url, cache_dir=tmp_path / "c")
        assert Path(path).read_bytes() == WEIGHTS and again.head(REPO) == oid


def test_no_network_switches_are_restored(hub: HubServer) -> None:
    from huggingface_hub import constants

    switches = (constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET, constants.HF_HUB_DISABLE_TELEMETRY)
    assert switches == (False, True, True)
    with hub_client_settings(offline=True):
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE is False
    # conftest sets HF_HUB_OFFLINE=1 (and not HF_HUB_DISABLE_XET) before the import: every upload in
    # this file works only because both attributes are read at call time, after the fixture set them.
