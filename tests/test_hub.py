"""Hub publish and download through the real huggingface_hub client, against a loopback Hub.

The server (tests/hub_server.py) speaks the Hub protocol on 127.0.0.1 and keeps repos on
disk; nothing here patches huggingface_hub functions (only its run-time switches: Xet off,
telemetry off, offline on/off, and the cache directory).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from loramkit.bundle.manifest import FORMAT_VERSION
from loramkit.cli import run
from loramkit.prune.pruner import prune
from tests.factory import sample_texts

REPO = "tester/llama-loram"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    path = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def local_bundle(make_base_dir, tmp_path_factory) -> tuple[Path, Path]:
    base = make_base_dir("llama_gqa")
    out = tmp_path_factory.mktemp("hub") / "bundle"
    prune(base, out, 0.5, base_name="meta-llama/Llama-3.1-8B", show_progress=False)
    return base, out


@pytest.fixture
def bundle(local_bundle, tmp_path) -> Path:
    """A private copy: publish rewrites the card."""
    dst = tmp_path / "bundle"
    shutil.copytree(local_bundle[1], dst)
    return dst


def _publish(hub, bundle: Path, capsys, *extra: str) -> tuple[int, str, str]:
    rc = run(["publish", str(bundle), "--repo", REPO, "--endpoint", hub.url, "--token", hub.token, *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def _commits(hub) -> list[tuple[str, str]]:
    return [r for r in hub.requests if r[0] == "POST" and "/commit/" in r[1]]


def test_publish_train_recover_from_the_repo_id(hub, cache, bundle, local_bundle, tmp_path, capsys):
    base, _ = local_bundle
    rc, out, err = _publish(hub, bundle, capsys)
    assert rc == 0, err
    head = hub.head(REPO)
    assert f"{hub.url}/{REPO}/commit/{head}" in out or head in out
    files = hub.commit(REPO)["files"]
    assert {"loram.json", "model.safetensors", "kept_indices.safetensors", "README.md", "config.json"} <= set(files)
    assert files["model.safetensors"]["lfs"]  # weights go through LFS
    assert hub.head(REPO, f"loram-format-v{FORMAT_VERSION}") == head  # tagged with the format version
    card = ModelCard.load(bundle / "README.md")  # read as the Hub reads it
    assert (card.data.base_model, card.data.library_name) == ("meta-llama/Llama-3.1-8B", "loramkit")
    assert card.data.base_model_relation == "finetune" and "loram" in card.data.tags
    assert f"loramkit train {REPO}" in card.text
    assert files["README.md"]["sha256"] == hashlib.sha256((bundle / "README.md").read_bytes()).hexdigest()  # uploaded
    assert run(["validate", str(bundle)]) == 0  # the refreshed card keeps the bundle sound

    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(sample_texts(200, seed=5)))
    adapter = tmp_path / "adapter"
    assert run(["train", REPO, "--data", str(data), "--out", str(adapter), "--max-steps", "2", "--seq-len", "32",
                "--endpoint", hub.url]) == 0  # fmt: skip
    record = json.loads((adapter / "loram_adapter.json").read_text())
    assert record["bundle_ref"] == f"{REPO}@{head}"
    assert run(["recover", str(adapter), "--out", str(tmp_path / "full"), "--bundle", REPO, "--endpoint", hub.url]) == 0
    assert (tmp_path / "full" / "adapter_model.safetensors").is_file()
    cfg = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "meta-llama/Llama-3.1-8B"


def test_recover_fetches_metadata_only_and_works_offline(hub, cache, bundle, tmp_path, capsys):
    import peft
    from huggingface_hub import constants

    from loramkit.model.loader import load_pruned_model

    assert _publish(hub, bundle, capsys)[0] == 0
    model = peft.get_peft_model(load_pruned_model(bundle), peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    hub.requests.clear()
    assert run(["recover", str(tmp_path / "adapter"), "--out", str(tmp_path / "a"), "--bundle", f"{REPO}@main",
                "--endpoint", hub.url]) == 0  # fmt: skip
    fetched = {p.rsplit("/", 1)[-1] for m, p in hub.requests if m == "GET" and "/resolve/" in p}
    assert "kept_indices.safetensors" in fetched and "model.safetensors" not in fetched
    # Offline: the cache serves what was fetched, and says so clearly for what was not.
    constants.HF_HUB_OFFLINE = True
    hub.requests.clear()
    assert run(["recover", str(tmp_path / "adapter"), "--out", str(tmp_path / "b"), "--bundle", f"{REPO}@main",
                "--endpoint", hub.url]) == 0  # fmt: skip
    assert hub.requests == []
    capsys.readouterr()
    assert run(["inspect", "tester/never-published", "--endpoint", hub.url]) == 1
    assert "offline" in capsys.readouterr().err


def test_republishing_an_unchanged_bundle_makes_no_commit(hub, cache, bundle, capsys):
    assert _publish(hub, bundle, capsys)[0] == 0
    head, commits = hub.head(REPO), len(_commits(hub))
    rc, out, _ = _publish(hub, bundle, capsys)
    assert rc == 0 and "up to date" in out
    assert hub.head(REPO) == head and len(_commits(hub)) == commits
    rc, out, _ = _publish(hub, bundle, capsys, "--json")  # one JSON object on stdout, the same facts
    s = json.loads(out)
    assert rc == 0 and (s["commit"], s["commit_url"], s["changed"], s["deleted"]) == (head, None, [], [])
    assert (
        s["tag"] == f"loram-format-v{FORMAT_VERSION}"
        and s["bundle_id"] == json.loads((bundle / "loram.json").read_text())["bundle_id"]
    )


def test_an_interrupted_upload_completes_on_rerun(hub, cache, bundle, capsys):
    hub.drop_next_upload(after_bytes=512, times=12)  # more than the client's 5 retries of each of 2 LFS files
    rc, _, err = _publish(hub, bundle, capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "re-run" in err
    rc, out, err = _publish(hub, bundle, capsys)
    assert rc == 0, err
    files = hub.commit(REPO)["files"]
    assert "model.safetensors" in files and "loram.json" in files
    from loramkit.bundle.hashing import sha256_file

    assert files["model.safetensors"]["sha256"] == sha256_file(bundle / "model.safetensors")


def test_a_file_altered_on_the_server_is_refused(hub, cache, bundle, tmp_path, capsys):
    assert _publish(hub, bundle, capsys)[0] == 0
    original = (bundle / "model.safetensors").read_bytes()
    hub.tamper(REPO, "model.safetensors", original[:-4] + b"\x00\x00\x00\x01")
    rc = run(["validate", REPO, "--endpoint", hub.url])
    err = capsys.readouterr().err
    assert rc == 1 and "does not match" in err and "model.safetensors" in err


def test_publish_refuses_an_unsound_bundle(hub, cache, bundle, capsys):
    with open(bundle / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x7f")
    rc, _, err = _publish(hub, bundle, capsys)
    assert rc == 1 and "not a sound bundle" in err
    assert _commits(hub) == []


def test_hf_endpoint_is_honoured_and_prune_takes_a_hub_base(hub, cache, local_bundle, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    base, _ = local_bundle
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo("tester/base")
    api.upload_folder(repo_id="tester/base", folder_path=str(base))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    out = tmp_path / "b"
    assert run(["prune", "tester/base", "--out", str(out), "--ratio", "0.5"]) == 0
    manifest = json.loads((out / "loram.json").read_text())
    assert manifest["base"]["name_or_path"] == "tester/base"
    assert manifest["base"]["revision"] == hub.head("tester/base")


def test_republishing_a_changed_bundle_sends_only_what_changed(hub, cache, bundle, local_bundle, tmp_path, capsys):
    """The library decides what to send: unchanged files are neither uploaded nor committed; stale ones go."""
    from huggingface_hub import HfApi

    from loramkit.bundle.hashing import sha256_file
    from loramkit.hub.publish import publish

    first = publish(bundle, REPO, endpoint=hub.url, token=hub.token, log=lambda m: None)
    assert first["commit_url"] and "model.safetensors" in first["changed"]
    HfApi(endpoint=hub.url, token=hub.token).upload_file(path_or_fileobj=b"old notes", path_in_repo="notes.txt", repo_id=REPO)
    other = tmp_path / "other"  # the same base pruned with other units kept: new weights and maps, same config
    prune(local_bundle[0], other, 0.5, importance="random", base_name="meta-llama/Llama-3.1-8B", show_progress=False)
    files = ["loram.json", *json.loads((other / "loram.json").read_text())["files"]]
    differ = sorted(f for f in files if not (bundle / f).is_file() or sha256_file(bundle / f) != sha256_file(other / f))
    assert "config.json" not in differ and "model.safetensors" in differ
    hub.requests.clear()
    second = publish(other, REPO, endpoint=hub.url, token=hub.token, log=lambda m: None)
    assert second["changed"] == differ and second["deleted"] == ["notes.txt"]
    uploads = [p for m, p in hub.requests if m == "PUT"]
    assert len(uploads) == sum(1 for f in differ if hub.commit(REPO)["files"][f]["lfs"])  # unchanged LFS files: not sent
    assert "notes.txt" not in hub.commit(REPO)["files"]
    assert hub.head(REPO, f"loram-format-v{FORMAT_VERSION}") == second["commit"] == hub.head(REPO)
