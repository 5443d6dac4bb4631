"""``loramkit publish``: a validated bundle to a Hub repo, in one commit, tagged with its format version."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

from ..bundle import Bundle
from ..bundle.card import CARD_NAME, render
from ..bundle.fsutil import write_json
from ..bundle.hashing import sha256_file
from ..bundle.manifest import MANIFEST_NAME, bundle_id
from ..errors import BundleError, LoramError
from .resolve import _configure, endpoint_of, transport_errors


def git_blob_oid(path: Path) -> str:
    """The git object id of a file: what the Hub reports for files stored in git, not LFS."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def refresh_card(path: Path, repo_id: str | None) -> bool:
    """Rewrite README.md from the manifest; the bundle_id does not change (the card is outside it)."""
    b = Bundle(path)
    card = render(b.manifest, repo_id)
    target = path / CARD_NAME
    if target.is_file() and target.read_text(encoding="utf-8") == card:
        return False
    tmp = path / f".{CARD_NAME}.tmp"
    tmp.write_text(card, encoding="utf-8")
    tmp.replace(target)
    manifest = dict(b.manifest)
    manifest["files"] = {**manifest["files"], CARD_NAME: {"sha256": sha256_file(target), "size": target.stat().st_size}}
    assert bundle_id(manifest) == b.bundle_id  # by construction: the card is not part of the identity
    write_json(path / MANIFEST_NAME, manifest)
    return True


def publish(
    path: str | Path,
    repo_id: str,
    *,
    revision: str = "main",
    private: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Validate, refresh the card, upload what changed in one commit, tag it. Returns commit facts.

    Re-publishing an unchanged bundle makes no commit.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from ..bundle.validate import validate

    path = Path(path)
    problems, _ = validate(path)
    if problems:
        raise BundleError(f"{path}: not a sound bundle ({problems[0]}); run `loramkit validate {path}` and fix it first")
    refresh_card(path, repo_id)
    b = Bundle(path)
    local = [MANIFEST_NAME, *b.manifest["files"]]
    ep = endpoint_of(endpoint)
    _configure(ep)
    api = HfApi(endpoint=ep, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
        remote = {s.rfilename: s for s in info.siblings or []}
        changed = [rel for rel in local if not _same(path / rel, remote.get(rel))]
        stale = [r for r in remote if r not in local and r != ".gitattributes"]
        if not changed and not stale:
            log(f"{repo_id}@{revision} already holds this bundle ({b.bundle_id}); no commit made")
            return {"commit": info.sha, "commit_url": None, "changed": [], "repo_id": repo_id}
        ops: list[Any] = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path / rel)) for rel in changed]
        ops += [CommitOperationDelete(path_in_repo=rel) for rel in stale]
        commit = api.create_commit(
            repo_id, ops, revision=revision,
            commit_message=f"LoRAM bundle {b.bundle_id[:23]} (format {b.manifest['format_version']})",
        )  # fmt: skip
        tag = f"loram-format-v{b.manifest['format_version']}"
        try:
            api.delete_tag(repo_id, tag=tag)
        except HfHubHTTPError:
            pass  # no such tag yet
        api.create_tag(repo_id, tag=tag, revision=commit.oid)
    except HfHubHTTPError as exc:
        first = str(exc).strip().splitlines()[0]
        raise LoramError(f"publishing to {repo_id} on {ep} failed: {first}") from None
    except RuntimeError as exc:  # huggingface_hub wraps a failed LFS upload in a RuntimeError
        if not isinstance(exc.__cause__, (*transport_errors(), HfHubHTTPError)):
            raise
        raise LoramError(
            f"publishing to {repo_id} on {ep} failed ({exc}); re-run the same command to resume: "
            "uploaded files are not sent again"
        ) from None
    except transport_errors() as exc:
        raise LoramError(
            f"publishing to {repo_id} on {ep} failed ({type(exc).__name__}: the connection broke); "
            "re-run the same command to resume: uploaded files are not sent again"
        ) from None
    return {"commit": commit.oid, "commit_url": commit.commit_url, "changed": changed, "deleted": stale, "tag": tag, "repo_id": repo_id}


def _same(local: Path, sibling: Any) -> bool:
    """Whether the Hub already has these exact bytes (LFS sha256, or git blob id)."""
    if sibling is None:
        return False
    lfs = getattr(sibling, "lfs", None)
    if lfs is not None:
        sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        return sha == sha256_file(local)
    return getattr(sibling, "blob_id", None) == git_blob_oid(local)
