"""``loramkit publish``: a validated bundle to a Hub repo, in one commit, tagged with its format version.

What to upload is huggingface_hub's call: every bundle file goes to ``create_commit``, which
asks the Hub which ones it already holds (same sha256 / git blob id) and leaves those out;
with nothing left it makes no commit. One commit, not ``upload_folder``: with Xet that one
may split a large folder into several commits, and a bundle must change all at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import progress
from ..bundle import Bundle
from ..bundle.card import CARD_NAME, render
from ..bundle.fsutil import output_lock, write_json, write_text
from ..bundle.hashing import sha256_file
from ..bundle.manifest import MANIFEST_NAME, bundle_id
from ..errors import BundleError, LoramError
from .resolve import configure_endpoint, endpoint_of, transport_errors


def refresh_card(path: Path, repo_id: str | None) -> bool:
    """Rewrite README.md from the manifest; the bundle_id does not change (the card is outside it)."""
    b = Bundle(path)
    card = render(b.manifest, repo_id)
    target = path / CARD_NAME
    if target.is_file() and target.read_text(encoding="utf-8") == card:
        return False
    write_text(target, card)
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
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from ..bundle.validate import validate

    try:  # before anything: the client's own rules for repo ids (our pattern lets org/a--b through)
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise LoramError(f"{repo_id}: not a valid Hub repo id ({str(exc).strip().splitlines()[0]})") from None
    path = Path(path)
    with output_lock(path):  # the local side (card, manifest) has one writer at a time
        problems, _ = validate(path)
        if problems:
            raise BundleError(f"{path}: not a sound bundle ({problems[0]}); run `loramkit validate {path}` and fix it first")
        refresh_card(path, repo_id)
    b = Bundle(path)
    local = [MANIFEST_NAME, *b.manifest["files"]]
    ep = endpoint_of(endpoint)
    configure_endpoint(ep)
    api = HfApi(endpoint=ep, token=token)
    tag = f"loram-format-v{b.manifest['format_version']}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        before = api.repo_info(repo_id, revision=revision).sha
        remote = _blob_ids(api, repo_id, before)
        ops: list[Any] = []
        sizes = {rel: (path / rel).stat().st_size for rel in local}
        with progress.task("sha256 for the Hub", sum(sizes.values()), transient=True) as advance:
            for rel in local:  # the library hashes each file here, to ask the Hub which it holds
                ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path / rel)))
                advance(sizes[rel])
        stale = sorted(r for r in remote if r not in local and r != ".gitattributes")
        ops += [CommitOperationDelete(path_in_repo=rel) for rel in stale]
        commit = api.create_commit(
            repo_id, ops, revision=revision, parent_commit=before,  # refused if someone pushed meanwhile
            commit_message=f"LoRAM bundle {b.bundle_id[:23]} (format {b.manifest['format_version']})",
        )  # fmt: skip
        made = commit.oid != before  # the library skips the commit when the Hub holds every file already
        after = _blob_ids(api, repo_id, commit.oid) if made else remote
        changed = sorted(rel for rel in local if after.get(rel) != remote.get(rel))
        _move_tag(api, repo_id, tag, commit.oid)
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
    if not made:
        log(f"{repo_id}@{revision} already holds this bundle ({b.bundle_id}); no commit made")
    return {
        "repo_id": repo_id, "revision": revision, "commit": commit.oid, "commit_url": commit.commit_url if made else None,
        "changed": changed, "deleted": stale if made else [], "tag": tag, "bundle_id": b.bundle_id,
    }  # fmt: skip


def _blob_ids(api: Any, repo_id: str, revision: str) -> dict[str, str]:
    """Path -> git blob id of every file at ``revision`` (an LFS file's id changes with its content too)."""
    from huggingface_hub import RepoFile

    return {e.path: e.blob_id for e in api.list_repo_tree(repo_id, recursive=True, revision=revision) if isinstance(e, RepoFile)}


def _move_tag(api: Any, repo_id: str, tag: str, commit: str) -> None:
    """Point ``tag`` at ``commit`` (the newest commit holding a bundle of this format)."""
    current = {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags}.get(tag)
    if current == commit:
        return
    if current is not None:
        api.delete_tag(repo_id, tag=tag)
    api.create_tag(repo_id, tag=tag, revision=commit)
