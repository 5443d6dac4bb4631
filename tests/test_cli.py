"""The ``loramkit`` command line: prune -> inspect -> validate -> recover, and every refusal.

Most tests call :func:`loramkit.cli.run` in-process (capsys); a few run the real console
entry point in a subprocess to prove what a shell user sees (exit codes, no tracebacks).

Contract under test (loramkit/cli/__init__.py): a user error prints exactly one line on
stderr starting with ``error:`` and exits 1; a usage error exits 2; refused commands
write nothing (no output directory, no ``.NAME.tmp-*`` staging directory).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramkit import cli

REPO = Path(__file__).resolve().parents[1]
CASE = "llama_gqa"  # GQA: 16 heads, 4 KV heads, intermediate 172, 8 layers
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------- helpers


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    rc = cli.run([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> str:
    """Exit 1, exactly one stderr line, starting with 'error:', containing every needle."""
    assert "Traceback" not in err, err
    assert rc == 1, (rc, err)
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_nothing_written(parent: Path, *names: str) -> None:
    for name in names:
        assert not (parent / name).exists(), f"{name} was written by a refused command"
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)]
    assert leftovers == [], f"staging directories left behind: {leftovers}"


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "loram.json").read_text(encoding="utf-8"))


def console_command() -> tuple[list[str], dict[str, str]]:
    """The installed console script when there is one, else ``python -m loramkit``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    script = Path(sys.executable).with_name("loramkit")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)], env
    return [sys.executable, "-m", "loramkit"], env


def run_console(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd, env = console_command()
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base(make_base_dir) -> Path:
    return make_base_dir(CASE)


@pytest.fixture(scope="module")
def pruned(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """``loramkit prune BASE --out B --ratio 0.5`` -> (B, exit code, stdout). Read-only by contract."""
    out = tmp_path_factory.mktemp("cli_bundle") / "bundle"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.run(["prune", str(base), "--out", str(out), "--ratio", "0.5"])
    return out, rc, buf.getvalue()


@pytest.fixture(scope="module")
def bundle(pruned: tuple[Path, int, str]) -> Path:
    path, rc, _ = pruned
    assert rc == 0
    return path


@pytest.fixture(scope="module")
def sharded_bundle(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli_sharded") / "bundle"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli.run(["prune", str(base), "--out", str(out), "--ratio", "0.5", "--max-shard-size", "400KB"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def adapter(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA adapter of ``load_pruned_model(bundle)`` with random non-zero A and B."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from loramkit import load_pruned_model

    out = tmp_path_factory.mktemp("cli_adapter") / "adapter"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(
            load_pruned_model(bundle), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        )
        model.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------- prune / inspect / validate


def test_prune_reports_one_line_with_counts_and_id(pruned, bundle):
    _, rc, out = pruned
    m = manifest(bundle)
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1, f"prune's summary wraps over {len(lines)} lines:\n{out}"
    p = m["parameters"]
    assert f"{p['original']:,}" in lines[0] and f"{p['pruned']:,}" in lines[0]
    assert m["bundle_id"] in lines[0]


def test_inspect_table(capsys, base, bundle):
    m = manifest(bundle)
    rc, out, err = run_cli(capsys, "inspect", bundle)
    assert rc == 0, err
    # Long values (an absolute base path, the 71-character bundle id) are printed whole.
    assert m["base"]["name_or_path"] == str(base.resolve())
    assert str(base.resolve()) in out
    assert m["bundle_id"] in out
    orig, pruned_n = m["parameters"]["original"], m["parameters"]["pruned"]
    assert orig >= 1000 and f"{orig:,}" in out and f"{pruned_n:,}" in out
    assert "," in f"{pruned_n:,}"

    # The per-layer table: one row per layer, kept/original where pruned, original otherwise.
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│")[1:-1]]
        if len(cells) == 5 and cells[0].isdigit():
            rows[int(cells[0])] = cells[1:]
    layers = m["architecture"]["layers"]
    assert sorted(rows) == list(range(len(layers))) == list(range(8))

    def cell(d):
        return str(d["original"]) if d["kept"] == d["original"] else f"{d['kept']}/{d['original']}"

    for d in layers:
        want = ["yes" if d["pruned"] else "", cell(d["num_attention_heads"]), cell(d["num_key_value_heads"]),
                cell(d["intermediate_size"])]  # fmt: skip
        assert rows[d["index"]] == want, (d["index"], rows[d["index"]], want)
    assert any(d["pruned"] for d in layers) and not all(d["pruned"] for d in layers)
    assert rows[m["pruning"]["pruned_layers"][0]][1:] == ["8/16", "2/4", "86/172"]


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_inspect_json(capsys, which, bundle, sharded_bundle):
    path = bundle if which == "single" else sharded_bundle
    rc, out, err = run_cli(capsys, "inspect", path, "--json")
    assert rc == 0, err
    s = json.loads(out)
    m = manifest(path)
    assert s["parameters"]["pruned"] < s["parameters"]["original"]
    assert s["parameters"] == m["parameters"]
    config = json.loads((path / "config.json").read_text())
    assert len(s["layers"]) == config["num_hidden_layers"] == 8
    assert [d["index"] for d in s["layers"]] == list(range(8))
    weight_files = [p for p in path.glob("*.safetensors") if p.name != "kept_indices.safetensors"]
    assert len(weight_files) == (1 if which == "single" else len(m["weights"]["files"]))
    if which == "sharded":
        assert len(weight_files) > 1
    assert s["bytes"]["weights"] == sum(p.stat().st_size for p in weight_files)
    everything = [p for p in path.iterdir() if p.is_file() and p.name != "loram.json"]
    assert s["bytes"]["total"] == sum(p.stat().st_size for p in everything)
    assert s["bundle_id"] == m["bundle_id"]


def test_validate_sound(capsys, bundle):
    m = manifest(bundle)
    rc, out, err = run_cli(capsys, "validate", bundle)
    assert rc == 0, err
    assert "sound" in out
    assert "problem" not in err and "error" not in err
    # specs/bundle-v1.md section 9: the command reports the format version and bundle_id.
    assert m["format_version"] in out + err
    assert m["bundle_id"] in out + err


def test_validate_problem_lines_are_single_lines(capsys, bundle, tmp_path):
    """Each problem and the final error are one line each, however long the path."""
    copy = tmp_path / ("a-rather-long-directory-name-" * 3) / "bundle"
    shutil.copytree(bundle, copy)
    p = copy / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    rc, out, err = run_cli(capsys, "validate", copy)
    assert rc == 1
    assert "Traceback" not in err
    lines = err.splitlines()
    assert all(line.startswith(("problem: ", "warning: ", "error: ")) for line in lines), err
    problems = [line for line in lines if line.startswith("problem: ")]
    assert len(problems) == 1 and str(p) in problems[0]
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]]
    assert str(copy) in lines[-1]


# ---------------------------------------------------------------------------- recover


def test_recover_writes_full_size_adapter(capsys, bundle, adapter, base, tmp_path):
    out = tmp_path / "recovered"
    rc, stdout, err = run_cli(capsys, "recover", adapter, "--out", out, "--bundle", bundle)
    assert rc == 0, err
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == manifest(bundle)["base"]["name_or_path"]
    assert config["r"] == 4
    t = load_file(str(out / "adapter_model.safetensors"))
    layer = manifest(bundle)["pruning"]["pruned_layers"][0]
    q_b = t[f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_B.weight"]
    o_a = t[f"base_model.model.model.layers.{layer}.self_attn.o_proj.lora_A.weight"]
    down_a = t[f"base_model.model.model.layers.{layer}.mlp.down_proj.lora_A.weight"]
    assert q_b.shape == (256, 4) and o_a.shape == (4, 256) and down_a.shape == (4, 172)  # original dims
    assert_nothing_written(tmp_path)
    # Without --bundle: the adapter names its bundle (through PEFT's copied model tags).
    rc, _, err = run_cli(capsys, "recover", adapter, "--out", tmp_path / "again")
    assert rc == 0, err
    assert load_file(str(tmp_path / "again" / "adapter_model.safetensors")).keys() == t.keys()


def test_recover_merge_writes_merged_model(capsys, bundle, adapter, base, tmp_path):
    out, merged = tmp_path / "recovered", tmp_path / "merged"
    rc, _, err = run_cli(
        capsys, "recover", adapter, "--out", out, "--bundle", bundle, "--merge", "--base", base, "--merged-out", merged
    )
    assert rc == 0, err
    assert (merged / "config.json").is_file()
    weights = sorted(merged.glob("*.safetensors"))
    assert weights, "no merged weights"
    got: dict[str, torch.Tensor] = {}
    for w in weights:
        got |= load_file(str(w))
    ref = load_file(str(base / "model.safetensors"))
    assert got.keys() == ref.keys()
    torch.testing.assert_close(got["model.embed_tokens.weight"], ref["model.embed_tokens.weight"], rtol=0, atol=0)
    # The merged weight is base + (alpha / r) * B_full @ A_full of the recovered adapter.
    rec = load_file(str(out / "adapter_model.safetensors"))
    layer = manifest(bundle)["pruning"]["pruned_layers"][0]
    name = f"model.layers.{layer}.self_attn.q_proj"
    delta = rec[f"base_model.model.{name}.lora_B.weight"] @ rec[f"base_model.model.{name}.lora_A.weight"] * (8 / 4)
    torch.testing.assert_close(got[f"{name}.weight"], ref[f"{name}.weight"] + delta, rtol=1e-5, atol=1e-6)
    # Rows of pruned query heads get no update.
    kept = load_file(str(bundle / "kept_indices.safetensors"))[f"{name}.weight:0"]
    dropped = torch.ones(256, dtype=torch.bool)
    dropped[kept] = False
    assert dropped.any()
    assert torch.equal(got[f"{name}.weight"][dropped], ref[f"{name}.weight"][dropped])
    assert not torch.equal(got[f"{name}.weight"][kept], ref[f"{name}.weight"][kept])


@pytest.mark.parametrize("extra", [[], ["--merged-out", "merged"]], ids=["no-base", "no-base-with-merged-out"])
def test_recover_merge_without_base_is_refused(capsys, adapter, bundle, tmp_path, extra):
    extra = [str(tmp_path / e) if e == "merged" else e for e in extra]
    rc, out, err = run_cli(capsys, "recover", adapter, "--out", tmp_path / "rec", "--bundle", bundle, "--merge", *extra)
    assert_one_line_error(rc, err, "--base")
    assert_nothing_written(tmp_path, "rec", "merged")


def test_recover_merge_onto_wrong_base_takes_back_the_adapter(capsys, make_base_dir, adapter, bundle, tmp_path):
    wrong = make_base_dir("llama_mha")
    rc, _, err = run_cli(
        capsys, "recover", adapter, "--out", tmp_path / "rec", "--bundle", bundle,
        "--merge", "--base", wrong, "--merged-out", tmp_path / "merged",
    )  # fmt: skip
    assert_one_line_error(rc, err, str(wrong))
    assert_nothing_written(tmp_path, "rec", "merged")


# ---------------------------------------------------------------------------- prune refusals


def _gpt2_base(base: Path, tmp_path: Path) -> Path:
    d = tmp_path / "gpt2-base"
    shutil.copytree(base, d)
    for p in d.iterdir():
        p.chmod(0o644)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _pickle_base(base: Path, tmp_path: Path) -> Path:
    d = tmp_path / "pickle-base"
    d.mkdir()
    shutil.copyfile(base / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a pickle")
    return d


PRUNE_REFUSALS = {
    # id: (extra args, builder of the base dir or None, needles in the message)
    "ratio-1.0": (["--ratio", "1.0"], None, ["ratio", "1.0"]),
    "ratio-negative": (["--ratio", "-0.1"], None, ["ratio", "-0.1"]),
    "keep-too-many": (["--ratio", "0.5", "--keep-first", "5", "--keep-last", "4"], None, ["5", "4", "8 layers"]),
    "taylor-no-calibration": (["--ratio", "0.5", "--importance", "taylor"], None, ["taylor", "--calibration"]),
    "taylor-missing-calibration": (["--ratio", "0.5", "--importance", "taylor", "--calibration", "nope.txt"], None, ["nope.txt"]),
    "max-shard-size-bogus": (["--ratio", "0.5", "--max-shard-size", "lots"], None, ["lots"]),
    "pickle-only-base": (["--ratio", "0.5"], _pickle_base, ["pickle", "never"]),
    "unsupported-arch": (
        ["--ratio", "0.5"], _gpt2_base,
        ["GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PRUNE_REFUSALS))
def test_prune_refusals(capsys, base, tmp_path, case):
    extra, build, needles = PRUNE_REFUSALS[case]
    src = build(base, tmp_path) if build else base
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    rc, out, err = run_cli(capsys, "prune", src, "--out", out_parent / "bundle", *extra)
    assert_one_line_error(rc, err, *needles)
    assert_nothing_written(out_parent, "bundle")
    assert out == ""


def test_prune_unknown_importance_is_a_usage_error(capsys, base, tmp_path):
    rc, out, err = run_cli(capsys, "prune", base, "--out", tmp_path / "bundle", "--ratio", "0.5", "--importance", "bogus")
    assert rc == 2 and out == "" and "Traceback" not in err
    assert all(w in err for w in ("bogus", "random", "magnitude", "taylor", "activation")), err
    assert_nothing_written(tmp_path, "bundle")


def test_prune_nonexistent_base_names_the_path(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    rc, _, err = run_cli(capsys, "prune", missing, "--out", tmp_path / "bundle", "--ratio", "0.5")
    assert_one_line_error(rc, err, str(missing))
    assert_nothing_written(tmp_path, "bundle")


def test_prune_negative_seed_is_refused(capsys, base, tmp_path):
    """A negative seed would produce a bundle that fails its own schema (pruning.seed >= 0)."""
    rc, _, err = run_cli(capsys, "prune", base, "--out", tmp_path / "bundle", "--ratio", "0.5", "--seed", "-3")
    assert rc in (1, 2), err
    assert "Traceback" not in err and "seed" in err
    assert_nothing_written(tmp_path, "bundle")


def test_prune_refuses_existing_out_and_overwrite_replaces_it(capsys, base, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep-me.txt").write_text("user data")
    rc, _, err = run_cli(capsys, "prune", base, "--out", out, "--ratio", "0.5")
    assert_one_line_error(rc, err, str(out), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep-me.txt"]
    assert_nothing_written(tmp_path)

    rc, _, err = run_cli(capsys, "prune", base, "--out", out, "--ratio", "0.25", "--overwrite")
    assert rc == 0, err
    assert not (out / "keep-me.txt").exists()
    assert manifest(out)["pruning"]["ratio"] == 0.25
    assert_nothing_written(tmp_path)
    rc, out_text, err = run_cli(capsys, "validate", out)
    assert rc == 0, err


# ---------------------------------------------------------------------------- the real console script


def test_console_help(tmp_path):
    r = run_console("--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    for command in ("prune", "inspect", "validate", "recover"):
        assert command in r.stdout


def test_console_usage_error_exits_2(make_base_dir, tmp_path):
    r = run_console("prune", make_base_dir(CASE), "--out", tmp_path / "b", cwd=tmp_path)  # no --ratio
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert "ratio" in r.stderr
    assert not (tmp_path / "b").exists()


def test_console_user_error_is_one_line(tmp_path):
    missing = tmp_path / "no-such-model"
    r = run_console("prune", missing, "--out", tmp_path / "b", "--ratio", "0.5", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(missing) in lines[0], r.stderr
    assert_nothing_written(tmp_path, "b")


def test_run_usage_error_returns_2_in_process(capsys, base, tmp_path):
    """``cli.run`` returns 2 (and raises nothing) for a missing option or an unknown one."""
    rc, _, err = run_cli(capsys, "prune", base, "--out", tmp_path / "b")
    assert rc == 2 and "ratio" in err
    rc, _, err = run_cli(capsys, "prune", base, "--out", tmp_path / "b", "--ratio", "0.5", "--bogus")
    assert rc == 2 and "--bogus" in err
    assert_nothing_written(tmp_path, "b")


# ---------------------------------------------------------------------------- --json and choices

SUMMARY_COMMANDS = ("prune", "validate", "quantize", "train", "recover", "align", "publish", "eval", "inspect", "plan")


@pytest.mark.parametrize("command", SUMMARY_COMMANDS)
def test_every_summary_command_takes_json(capsys, command):
    rc, out, _ = run_cli(capsys, command, "--help")
    assert rc == 0 and "--json" in out


def run_json(capsys, *args: object) -> tuple[int, dict]:
    """Run with --json: stdout must be exactly one JSON object (messages and progress go to stderr)."""
    rc, out, err = run_cli(capsys, *args, "--json")
    assert "Traceback" not in err, err
    s = json.loads(out)
    assert isinstance(s, dict)
    return rc, s


def test_prune_and_quantize_json_is_the_bundle_summary(capsys, base, tmp_path):
    rc, s = run_json(capsys, "prune", base, "--out", tmp_path / "b", "--ratio", "0.5")
    m = manifest(tmp_path / "b")
    assert rc == 0 and s["bundle_id"] == m["bundle_id"] and s["parameters"] == m["parameters"]
    assert s["path"] == str(tmp_path / "b") and s["quantization"] is None
    assert run_json(capsys, "inspect", tmp_path / "b")[1] == s  # the same object inspect --json prints
    rc, q = run_json(capsys, "quantize", tmp_path / "b", "--out", tmp_path / "q", "--type", "fp4")
    assert rc == 0 and q["quantization"]["quant_type"] == "fp4" and q["bundle_id"] == manifest(tmp_path / "q")["bundle_id"]
    assert q["parameters"] == s["parameters"] and q["quantized_bytes"]["4bit"] > 0


def test_validate_json(capsys, bundle, tmp_path):
    m = manifest(bundle)
    rc, s = run_json(capsys, "validate", bundle)
    assert rc == 0 and s["sound"] is True and s["problems"] == []
    assert (s["format_version"], s["bundle_id"]) == (m["format_version"], m["bundle_id"])
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    rc, s = run_json(capsys, "validate", copy)
    assert rc == 1 and s["sound"] is False  # the exit code still says it
    assert len(s["problems"]) == 1 and "model.safetensors" in s["problems"][0]


def test_recover_json(capsys, bundle, adapter, base, tmp_path):
    rc, s = run_json(capsys, "recover", adapter, "--out", tmp_path / "a", "--bundle", bundle)
    assert rc == 0 and s["out"] == str(tmp_path / "a") and s["merged"] is None
    assert s["bundle_id"] == manifest(bundle)["bundle_id"] and s["modules"] > 0
    rc, s = run_json(capsys, "recover", adapter, "--out", tmp_path / "b", "--bundle", bundle,
                     "--merge", "--base", base, "--merged-out", tmp_path / "m")  # fmt: skip
    assert rc == 0 and s["merged"] == str(tmp_path / "m") and (tmp_path / "m" / "config.json").is_file()


def test_plan_json(capsys, base):
    rc, s = run_json(capsys, "plan", base / "config.json", "--ratio", "0.5", "--quantize", "fp4")
    assert rc == 0 and [m["method"] for m in s["methods"]] == ["full fine-tuning", "LoRA", "QLoRA", "LoRAM", "QLoRAM"]


@pytest.mark.parametrize("args", [("plan", "{config}", "--ratio", "0.5", "--quantize", "int4"),
                                  ("prune", "{base}", "--out", "{tmp}/b", "--ratio", "0.5", "--quantize", "int4"),
                                  ("quantize", "{bundle}", "--out", "{tmp}/q", "--type", "int4")])  # fmt: skip
def test_choices_are_enums(capsys, base, bundle, tmp_path, args):
    """An unknown choice is a usage error (exit 2) that lists the choices, before any work."""
    fill = {"config": base / "config.json", "base": base, "bundle": bundle, "tmp": tmp_path}
    rc, out, err = run_cli(capsys, *(a.format(**fill) for a in args))
    assert rc == 2 and out == "" and "'int4' is not one of 'nf4', 'fp4'" in err, err
    assert_nothing_written(tmp_path, "b", "q")


def test_data_format_choices_match_the_library():
    from loramkit.cli._common import DataFormat
    from loramkit.train.data import FORMATS

    assert [f.value for f in DataFormat] == ["auto", *FORMATS]


# ---------------------------------------------------------------------------- library warnings


def test_known_noise_is_filtered_by_message_and_every_other_warning_shows():
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli._quiet_libraries()
        for message in ("`is_gradient_checkpointing` is deprecated and will be removed in v6.", "news from a library"):
            for category in (FutureWarning, DeprecationWarning, UserWarning):
                warnings.warn(message, category)
    assert [(str(w.message), w.category) for w in seen] == [
        ("news from a library", FutureWarning), ("news from a library", DeprecationWarning), ("news from a library", UserWarning)
    ]  # fmt: skip


def test_known_noise_matches_what_the_libraries_say(make_base_dir):
    """Each pattern still matches a warning the libraries really give (drop patterns they no longer need)."""
    import re
    import warnings

    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_base_dir(CASE))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    said = [str(w.message) for w in seen]
    for pattern in cli.KNOWN_NOISE:
        assert any(re.match(pattern, m) for m in said), (pattern, said)


def test_train_align_eval_json(capsys, bundle, tmp_path):
    from tests.factory import sample_texts

    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(sample_texts(120, seed=5)))
    short = ("--max-steps", "2", "--seq-len", "32")
    rc, s = run_json(capsys, "train", bundle, "--data", data, "--out", tmp_path / "adapter", *short, "--data-format", "text")
    assert rc == 0 and s["steps"] == 2 and s["data_format"] == "text" and (tmp_path / "adapter" / "adapter_config.json").is_file()
    rc, s = run_json(capsys, "align", bundle, "--data", data, "--out", tmp_path / "aligned", *short, "--warmup-steps", "0")
    assert rc == 0 and s["steps"] == 2 and s["bundle_id"] == manifest(tmp_path / "aligned")["bundle_id"]
    rc, s = run_json(capsys, "eval", bundle, "--data", data, "--seq-len", "32", "--data-format", "text")
    assert rc == 0 and s["examples"] > 0 and s["loss"] > 0 and s["data_format"] == "text"
    rc, _, err = run_cli(capsys, "eval", bundle, "--data", data, "--data-format", "csv")
    assert rc == 2 and "'csv' is not one of" in err


# ---------------------------------------------------------------------------- issue 13: the output contract


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) -> sha256: an input is intact when this is unchanged."""
    import hashlib

    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_prune_into_the_parent_of_its_base_is_refused(capsys, base, tmp_path):
    """Before: `prune PARENT/base --out PARENT --overwrite` deleted the base and everything beside it."""
    parent = tmp_path / "parent"
    shutil.copytree(base, parent / "base")
    (parent / "beside.txt").write_text("mine")
    before = tree_digest(parent)
    rc, out, err = run_cli(capsys, "prune", parent / "base", "--out", parent, "--ratio", "0.5", "--overwrite")
    assert_one_line_error(rc, err, "contains the input")
    assert out == "" and tree_digest(parent) == before
    rc, _, err = run_cli(capsys, "prune", parent / "base", "--out", parent / "base" / "b", "--ratio", "0.5")
    assert_one_line_error(rc, err, "lies inside the input")
    assert tree_digest(parent) == before


@pytest.mark.parametrize("target", ["adapter", "bundle"])
def test_recover_onto_its_own_inputs_is_refused(capsys, adapter, bundle, tmp_path, target):
    """Before: `recover A --out A --overwrite` replaced the adapter it read; `--out BUNDLE` the bundle."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(adapter, a)
    shutil.copytree(bundle, b)
    before = (tree_digest(a), tree_digest(b))
    rc, _, err = run_cli(capsys, "recover", a, "--bundle", b, "--out", {"adapter": a, "bundle": b}[target], "--overwrite")
    assert_one_line_error(rc, err, "is the input")
    assert (tree_digest(a), tree_digest(b)) == before


def test_recover_merge_with_a_wrong_base_keeps_the_existing_outputs(capsys, adapter, bundle, base, tmp_path, make_base_dir):
    """Before: `recover --merge --overwrite` with a wrong --base deleted the existing --out first."""
    out, merged = tmp_path / "recovered", tmp_path / "merged"
    rc, _, err = run_cli(
        capsys, "recover", adapter, "--out", out, "--bundle", bundle, "--merge", "--base", base, "--merged-out", merged
    )
    assert rc == 0, err
    for d in (out, merged):  # the outputs of an earlier run, told apart from what this one would write
        (d / "earlier-run.txt").write_text("mine")
    before = (tree_digest(out), tree_digest(merged))
    wrong = make_base_dir("qwen2")
    rc, _, err = run_cli(capsys, "recover", adapter, "--out", out, "--bundle", bundle, "--merge", "--base", wrong,
                         "--merged-out", merged, "--overwrite")  # fmt: skip
    assert_one_line_error(rc, err, str(wrong))
    assert (tree_digest(out), tree_digest(merged)) == before  # before: OUT was replaced, then the merge failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "recovered"]


_KILL_MID_MERGE = """
import os, signal, sys
from loramkit.bundle import safetensors_io
from loramkit import cli
real = safetensors_io.StreamingWriter.write
def write(self, *a, **k):
    real(self, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the merged weights
safetensors_io.StreamingWriter.write = write
sys.exit(cli.run(sys.argv[1:]))
"""


def test_recover_merge_killed_with_sigkill_can_simply_be_run_again(capsys, adapter, bundle, base, tmp_path):
    """Before: after kill -9 of `recover --merge`, the identical command said OUT already exists."""
    out, merged = tmp_path / "recovered", tmp_path / "merged"
    args = [
        "recover",
        str(adapter),
        "--out",
        str(out),
        "--bundle",
        str(bundle),
        "--merge",
        "--base",
        str(base),
        "--merged-out",
        str(merged),
    ]
    killed = subprocess.run([sys.executable, "-c", _KILL_MID_MERGE, *args], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists() and not merged.exists()  # neither output; only hidden staging leftovers
    rc, _, err = run_cli(capsys, *args)  # the identical command
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "recovered"]  # leftovers cleaned up


def test_a_killed_prunes_staging_folder_is_removed_by_the_next_prune(capsys, base, tmp_path):
    """Before: a killed prune left a hidden full-size `.OUT.tmp-*` folder that no command removed."""
    stale = tmp_path / ".bundle.tmp-0badc0de"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    rc, _, err = run_cli(capsys, "prune", base, "--out", tmp_path / "bundle", "--ratio", "0.5")
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_prune_on_a_full_disk_is_one_line_and_leaves_nothing(capsys, base, tmp_path, monkeypatch):
    """Before: a traceback (OSError ENOSPC) and, depending on where, a partial staging folder."""
    import errno

    from loramkit.bundle import safetensors_io

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors_io.StreamingWriter, "write", full)
    rc, out, err = run_cli(capsys, "prune", base, "--out", tmp_path / "bundle", "--ratio", "0.5")
    assert_one_line_error(rc, err, str(tmp_path / "bundle"), "not enough disk space", "bytes")
    assert out == "" and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- issue 13: one line for every failure


def test_a_bug_is_one_internal_error_line_and_a_traceback_only_with_debug(capsys, monkeypatch, bundle):
    """Before: an unexpected exception printed its whole traceback."""
    from loramkit.bundle import manifest

    def bug(m):
        raise RuntimeError("unexpected\nsecond line")

    monkeypatch.setattr(manifest, "schema_errors", bug)
    rc, out, err = run_cli(capsys, "inspect", bundle)
    assert rc == 1 and out == "" and "Traceback" not in err
    assert err.splitlines() == ["error: internal error: RuntimeError: unexpected (run with --debug for the traceback)"]
    rc, _, err = run_cli(capsys, "--debug", "inspect", bundle)
    assert rc == 1 and "Traceback" in err and err.splitlines()[-1].startswith("error: internal error: RuntimeError")
    monkeypatch.setenv("LORAMKIT_DEBUG", "1")
    rc, _, err = run_cli(capsys, "inspect", bundle)
    assert rc == 1 and "Traceback" in err


def test_a_permission_error_is_one_line(capsys, base, tmp_path, monkeypatch):
    """Before: a traceback (PermissionError); the test simulates it so it also runs as root."""
    import errno

    from loramkit.bundle import safetensors_io

    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/mnt/readonly/x")

    monkeypatch.setattr(safetensors_io.StreamingWriter, "write", denied)
    rc, out, err = run_cli(capsys, "prune", base, "--out", tmp_path / "bundle", "--ratio", "0.5")
    assert_one_line_error(rc, err, "/mnt/readonly/x: permission denied")
    assert out == "" and list(tmp_path.iterdir()) == []


def test_sigterm_mid_prune_exits_130_and_leaves_nothing(capsys, base, tmp_path, monkeypatch):
    """Before: SIGTERM killed the process where it stood, leaving its hidden staging folder."""
    import signal

    from loramkit.bundle import safetensors_io

    real = safetensors_io.StreamingWriter.write

    def write(self, *a, **k):
        real(self, *a, **k)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(safetensors_io.StreamingWriter, "write", write)
    rc, out, err = run_cli(capsys, "prune", base, "--out", tmp_path / "bundle", "--ratio", "0.5")
    assert rc == 130 and err.splitlines() == ["terminated; no output was written"]
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


# ---------------------------------------------------------------------------- issue 13: arguments


@pytest.mark.parametrize(
    "args, needle",
    [
        (["prune", "BASE", "--out", "OUT", "--ratio", "nan"], "--ratio nan is out of range"),
        (["prune", "BASE", "--out", "OUT", "--ratio", "1"], "--ratio 1.0 is out of range"),
        (["prune", "BASE", "--out", "OUT", "--ratio", "0.5", "--keep-first", "-1"], "--keep-first -1"),
        (["prune", "BASE", "--out", "OUT", "--ratio", "0.5", "--calibration-samples", "0"], "--calibration-samples 0"),
        (["plan", "BASE", "--ratio", "inf"], "--ratio inf is out of range"),
        (["plan", "BASE", "--ratio", "0.5", "--lora-rank", "0"], "--lora-rank 0"),
        (["plan", "BASE", "--ratio", "0.5", "--batch", "0"], "--batch 0"),
        (["eval", "BASE", "--data", "DATA", "--micro-batch", "0"], "--micro-batch 0"),
        (["eval", "BASE", "--data", "DATA", "--seq-len", "0"], "--seq-len 0"),
    ],
)
def test_numeric_options_out_of_range_are_one_line(capsys, base, tmp_path, args, needle):
    """Before: NaN ratios and zero batch sizes ran on (tracebacks, or output from nonsense)."""
    data = tmp_path / "data.txt"
    data.write_text("some text\n")
    sub = {"BASE": str(base), "OUT": str(tmp_path / "out"), "DATA": str(data)}
    rc, out, err = run_cli(capsys, *[sub.get(a, a) for a in args])
    assert_one_line_error(rc, err, needle)
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
@pytest.mark.parametrize("command", ["prune", "eval"])
def test_device_cuda_without_cuda_is_one_line(capsys, base, tmp_path, command):
    data = tmp_path / "data.txt"
    data.write_text("some text\n")
    args = ["prune", base, "--out", tmp_path / "out", "--ratio", "0.5"] if command == "prune" else ["eval", base, "--data", data]
    rc, _, err = run_cli(capsys, *args, "--device", "cuda")
    assert_one_line_error(rc, err, "CUDA is not available")


def test_hub_ids_the_client_rejects_are_one_line(capsys, tmp_path, monkeypatch):
    """Before: `org/a--b` (our pattern accepts it, huggingface_hub does not) was a traceback."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(capsys, "recover", "org/a--b", "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "org/a--b", "not a valid Hub repo id")


def test_an_unreachable_endpoint_is_not_called_offline(capsys, tmp_path, monkeypatch):
    """Before: an unreachable --endpoint was reported as 'offline (HF_HUB_OFFLINE=1)' with offline mode unset."""
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    rc, _, err = run_cli(capsys, "recover", "org/name", "--out", tmp_path / "out", "--endpoint", "http://127.0.0.1:9")
    line = assert_one_line_error(rc, err, "http://127.0.0.1:9 could not be reached")
    assert "HF_HUB_OFFLINE" not in line


def test_publish_to_a_repo_id_the_client_rejects_is_one_line_before_any_work(capsys, bundle):
    rc, _, err = run_cli(capsys, "publish", bundle, "--repo", "org/a--b")
    assert_one_line_error(rc, err, "org/a--b", "not a valid Hub repo id")


def test_a_second_prune_to_the_same_out_is_refused_while_the_first_writes(capsys, base, tmp_path):
    """Before: two concurrent prunes to one --out both reported success; one result silently replaced the other."""
    out = tmp_path / "bundle"
    holder = subprocess.Popen(  # the first writer: holds OUT's lock, as a running prune does
        [sys.executable, "-c", "import sys; from loramkit.bundle.fsutil import output_lock\n"
         f"with output_lock({str(out)!r}):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, _, err = run_cli(capsys, "prune", base, "--out", out, "--ratio", "0.5", "--overwrite")
        assert_one_line_error(rc, err, "another loramkit process is writing it")
        assert not out.exists()
    finally:
        holder.communicate("")
