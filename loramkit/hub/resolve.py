"""Turn what a user typed (a local path or ``org/name[@revision]``) into a local directory.

Downloads go through huggingface_hub's cache, fetch only the files a command needs, and
every bundle file is checked against the manifest's sha256 before anything reads it.
With ``HF_HUB_OFFLINE=1`` the cache is used alone.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..bundle.manifest import ADAPTER_RECORD_NAME, MANIFEST_NAME
from ..bundle.model_dir import INDEX_NAME, TOKENIZER_FILES
from ..errors import BaseModelError, BundleError, LoramError

# org/name, optionally @revision (branch, tag or commit). Hub names: letters, digits, - _ .
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
HF_ENDPOINT = "https://huggingface.co"

# What each use of a bundle needs (patterns relative to the bundle root).
BUNDLE_METADATA = (MANIFEST_NAME, "config.json", "kept_indices.safetensors", "README.md")


def transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures as huggingface_hub raises them: its HTTP client's transport errors (the
    client changed from requests to httpx to httpx2 across releases) and OSError."""
    errors: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_ref(ref: str | Path) -> Path | HubRef:
    """An existing local path, else ``org/name[@revision]`` as a Hub reference, else a (missing) path."""
    text = str(ref)
    if isinstance(ref, Path) or Path(text).expanduser().exists():
        return Path(text).expanduser()
    m = _REPO_ID.match(text)
    return HubRef(m["repo"], m["rev"]) if m else Path(text)


def endpoint_of(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")


def offline() -> bool:
    """huggingface_hub's offline switch (HF_HUB_OFFLINE, read when huggingface_hub is imported)."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def configure_endpoint(endpoint: str) -> None:
    """Xet is the Hugging Face Hub's own storage: any other endpoint gets plain HTTP and LFS,
    and no telemetry call to huggingface.co (which the client would make whatever the endpoint)."""
    from huggingface_hub import constants

    if endpoint != HF_ENDPOINT:
        constants.HF_HUB_DISABLE_XET = True
        constants.HF_HUB_DISABLE_TELEMETRY = True


def download(ref: HubRef, patterns: list[str] | None, *, endpoint: str | None = None, token: str | None = None) -> Path:
    """``snapshot_download`` of the given files into the cache; returns the snapshot directory."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    ep = endpoint_of(endpoint)
    configure_endpoint(ep)
    try:
        path = snapshot_download(
            ref.repo_id, revision=ref.revision, allow_patterns=patterns, endpoint=ep, token=token,
            local_files_only=offline(),
        )  # fmt: skip
    except HFValidationError as exc:  # a name our pattern lets through and the client refuses (org/a--b)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoramError(f"{ref}: no such local directory, and not a valid Hub repo id ({first})") from None
    except RevisionNotFoundError:
        raise LoramError(f"{ref}: no revision {ref.revision!r} in {ref.repo_id} on {ep}") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise LoramError(
            f"{ref}: no such local directory, and no such repo on {ep} (or no access: pass --token or set HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        if offline():
            raise LoramError(f"{ref}: not in the local cache and offline (HF_HUB_OFFLINE=1); download it once online") from None
        # the client says so too when the endpoint cannot be reached: that is what happened here
        raise LoramError(
            f"{ref}: no such local directory, and {ep} could not be reached (not in the local cache either); "
            "check the path, or the network and the endpoint"
        ) from None
    except transport_errors() as exc:
        raise LoramError(
            f"{ref}: no such local directory, and downloading it from {ep} failed ({type(exc).__name__}); "
            "check the path, or the network and the endpoint"
        ) from None
    return Path(path)


def bundle_dir(ref: str | Path, need: str = "all", *, endpoint: str | None = None, token: str | None = None) -> Path:
    """A local bundle directory for ``ref``; Hub bundles are downloaded and verified.

    ``need``: ``"all"`` (train, inspect, validate, quantize), or ``"metadata"`` (recover:
    manifest, config and index maps, not the weights).
    """
    from ..bundle import Bundle

    where = parse_ref(ref)
    if isinstance(where, Path):
        return where
    manifest_only = download(where, [MANIFEST_NAME], endpoint=endpoint, token=token)
    manifest = Bundle(manifest_only).manifest  # version, schema and bundle_id checks before any weight
    if need == "metadata":
        wanted = [p for p in BUNDLE_METADATA if p in manifest["files"] or p == MANIFEST_NAME]
    else:
        wanted = [MANIFEST_NAME, *manifest["files"]]
    path = download(where, wanted, endpoint=endpoint, token=token)
    b = Bundle(path)
    for rel in wanted:
        if rel != MANIFEST_NAME:
            try:
                b.verify_file(rel)
            except BundleError as exc:
                raise BundleError(
                    f"{where}: downloaded {rel} does not match the manifest (altered on the server?): {exc}"
                ) from None
    return path


def identity(path: Path, ref: str | Path) -> tuple[str | None, str | None]:
    """(repo id, commit sha) of a Hub download, from the cache's snapshots/<commit> layout; (None, None) locally."""
    where = parse_ref(ref)
    if isinstance(where, Path):
        return None, None
    return where.repo_id, path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else None


def model_dir(ref: str | Path, *, endpoint: str | None = None, token: str | None = None) -> Path:
    """A local transformers model directory (config, safetensors weights, tokenizer) for ``ref``."""
    where = parse_ref(ref)
    if isinstance(where, Path):
        return where
    patterns = ["config.json", "*.safetensors", INDEX_NAME, *TOKENIZER_FILES]
    path = download(where, patterns, endpoint=endpoint, token=token)
    if not any(path.glob("*.safetensors")):
        raise BaseModelError(f"{where}: the repo has no safetensors weights (loramkit never loads pickle checkpoints)")
    return path


def model_or_bundle_dir(ref: str | Path, *, endpoint: str | None = None, token: str | None = None) -> Path:
    """A local bundle (when the repo holds one) or model directory for ``ref``."""
    where = parse_ref(ref)
    if isinstance(where, Path):
        return where
    if (download(where, [MANIFEST_NAME, "config.json"], endpoint=endpoint, token=token) / MANIFEST_NAME).is_file():
        return bundle_dir(where.repo_id + (f"@{where.revision}" if where.revision else ""), endpoint=endpoint, token=token)
    return model_dir(ref, endpoint=endpoint, token=token)


def adapter_dir(ref: str | Path, *, endpoint: str | None = None, token: str | None = None) -> Path:
    """A local PEFT adapter directory for ``ref``."""
    where = parse_ref(ref)
    if isinstance(where, Path):
        return where
    return download(where, ["adapter_config.json", "adapter_model.safetensors", "README.md", ADAPTER_RECORD_NAME],
                    endpoint=endpoint, token=token)  # fmt: skip
