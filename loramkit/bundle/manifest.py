"""The manifest, ``loram.json``: versions, identity, schema (specs/bundle-v1.md is normative)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import BundleError
from .hashing import canonical_json

FORMAT = "loram-bundle"
FORMAT_VERSION = "1.2.0"
MANIFEST_NAME = "loram.json"
INDEX_MAPS_NAME = "kept_indices.safetensors"
CARD_NAME = "README.md"
# Written by `loramkit train` next to a PEFT adapter: the bundle it belongs to (specs/bundle-v1.md).
ADAPTER_RECORD_NAME = "loram_adapter.json"
# Features listed in a manifest's "requires" that this reader implements.
KNOWN_FEATURES: frozenset[str] = frozenset({"quantization", "sparse"})
# In-memory upgrades, keyed by the (major, minor) they read; each returns the next version.
# None so far: 1.1 only adds the "quantization" feature and 1.2 the "sparse" one (an absent
# `sparsity` reads as null), so a 1.0 or 1.1 manifest is read as is (spec 8.3).
MIGRATIONS: dict[tuple[int, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}
SCHEMA_PATH = Path(__file__).with_name("bundle-v1.schema.json")


def parse_version(text: Any) -> tuple[int, int, int]:
    try:
        major, minor, patch = (int(p) for p in str(text).split("."))
    except ValueError:
        raise BundleError(f"format_version {text!r} is not a MAJOR.MINOR.PATCH version") from None
    return major, minor, patch


def bundle_id(manifest: dict[str, Any]) -> str:
    """Identity of a bundle's content: everything but the card and the creation stamp."""
    body = {k: v for k, v in manifest.items() if k not in ("bundle_id", "created_at", "created_by")}
    body["files"] = {p: e for p, e in manifest.get("files", {}).items() if p != CARD_NAME}
    return "sha256:" + hashlib.sha256(canonical_json(body)).hexdigest()


BUNDLE_TAG_PREFIX = "loram-bundle-"


def bundle_tag(bundle_id: str) -> str:
    """The model tag that binds adapters to a bundle: PEFT copies base-model tags into the adapter card."""
    return BUNDLE_TAG_PREFIX + bundle_id.removeprefix("sha256:")[:16]


def now_utc() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def created_by() -> str:
    from .. import __version__

    return f"loramkit {__version__}"


@lru_cache(maxsize=1)
def _validator() -> Any:
    import jsonschema

    # JSON Schema calls 1.0 and 1e308 integers; a reader computing shapes and counts cannot:
    # an integer is a JSON number written without fraction or exponent (a Python int).
    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine("integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool))
    strict = jsonschema.validators.extend(base, type_checker=checker)
    return strict(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))


def schema_errors(manifest: dict[str, Any]) -> list[str]:
    """Every way the manifest breaks the JSON Schema, as 'path: message' lines."""
    errors = sorted(_validator().iter_errors(manifest), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in errors]


def check_version(manifest: dict[str, Any], where: Path | str) -> dict[str, Any]:
    """Refuse what this reader cannot read correctly; upgrade older versions in memory."""
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{where}: not a LoRAM bundle manifest (format is {manifest.get('format')!r})")
    found = parse_version(manifest.get("format_version"))
    ours = parse_version(FORMAT_VERSION)
    if found[0] > ours[0]:
        raise BundleError(
            f"{where}: bundle format {'.'.join(map(str, found))} is newer than this loramkit reads "
            f"(format {ours[0]}.x, up to {FORMAT_VERSION}); upgrade loramkit"
        )
    while (found[0], found[1]) in MIGRATIONS and found[:2] < ours[:2]:
        manifest = MIGRATIONS[(found[0], found[1])](manifest)
        found = parse_version(manifest["format_version"])
    requires = manifest.get("requires") or []
    if not isinstance(requires, list) or not all(isinstance(f, str) for f in requires):
        raise BundleError(f"{where}: requires must be a list of feature names (strings)")
    unknown = sorted(set(requires) - KNOWN_FEATURES)
    if unknown:
        raise BundleError(
            f"{where}: bundle requires {', '.join(unknown)}, which this loramkit ({FORMAT_VERSION}) "
            "does not implement; upgrade loramkit"
        )
    return manifest


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"duplicate key {dupes[0]!r}")
    return dict(pairs)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard constant {name}")


def _parse_strict(path: Path) -> dict[str, Any]:
    """loram.json as the spec reads it: no duplicate keys, no NaN/Infinity, at most 64 MiB."""
    if path.stat().st_size > 64 * 2**20:
        raise BundleError(f"{path}: larger than 64 MiB; not a LoRAM manifest")
    try:
        data = json.loads(
            path.read_bytes().decode("utf-8"), object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: manifest is not valid JSON ({exc}); re-create or re-download the bundle") from None
    except RecursionError:
        raise BundleError(f"{path}: manifest nests deeper than any LoRAM manifest; re-create or re-download the bundle") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: manifest must be a JSON object")
    problem = _bounds_problem(data)
    if problem:
        raise BundleError(f"{path}: {problem}; re-create or re-download the bundle")
    return data


MAX_DEPTH = 16  # the schema's deepest path is 6 levels (base/tensors/NAME/shape/i)
_INT64 = (-(2**63), 2**63 - 1)


def _bounds_problem(value: Any, where: str = "(root)", depth: int = 0) -> str | None:
    """Bounds the schema cannot state: nesting depth, integers within int64 (shapes, sizes)."""
    if depth > MAX_DEPTH:
        return f"{where}: nested more than {MAX_DEPTH} levels deep"
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
        return f"{where}: integer {value} is outside the 64-bit range"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        problem = _bounds_problem(v, f"{where}/{k}" if where != "(root)" else str(k), depth + 1)
        if problem:
            return problem
    return None


def path_problems(manifest: dict[str, Any]) -> list[str]:
    """Every file a manifest names must be a relative path inside the bundle, listed in files."""
    out = []
    listed = manifest["files"]
    for rel in listed:
        parts = rel.split("/")
        if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
            out.append(f"files: {rel!r} is not a plain relative path inside the bundle")
    w = manifest["weights"]
    for rel in [*w["files"], *([w["index"]] if w.get("index") else []), manifest["index_maps"]]:
        if rel not in listed:
            out.append(f"{rel} is named by the manifest but not listed in files")
    return out


def load_manifest(bundle_dir: Path, check_id: bool = True) -> dict[str, Any]:
    """Read, version-check and schema-check a bundle's manifest, and check its bundle_id."""
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: no such bundle directory")
    if not path.exists():
        raise BundleError(f"{bundle_dir}: not a LoRAM bundle (no {MANIFEST_NAME}); create one with `loramkit prune`")
    manifest = check_version(_parse_strict(path), path)
    problems = schema_errors(manifest)
    if problems:
        raise BundleError(f"{path}: manifest does not follow the bundle schema: {problems[0]}")
    from ..families import FAMILIES  # spec 3.3: refuse a family this reader does not implement

    if manifest["architecture"]["family"] not in FAMILIES:
        family = manifest["architecture"]["family"]
        raise BundleError(f"{path}: model family {family!r} is not implemented by this loramkit; upgrade loramkit")
    paths = path_problems(manifest)
    if paths:
        raise BundleError(f"{path}: {paths[0]}")
    if check_id and bundle_id(manifest) != manifest["bundle_id"]:
        raise BundleError(f"{path}: bundle_id does not match the manifest's content (edited by hand?); re-create the bundle")
    return manifest
