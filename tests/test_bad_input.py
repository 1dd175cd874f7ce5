"""Bad input a user met: every case is one line on stderr, exit code 2, and no output written.

Non-finite or out-of-range parameters, a params file that is not a mapping, damaged adapter weights,
samples from another tokenizer; and the pickle in a foreign checkpoint is never unpickled by default,
while the demo's own checkpoints carry their trainer settings as plain JSON.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
import typing
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from entropy_probe import files  # noqa: E402
from entropy_probe.artifacts.samples import SAMPLES_FILE, SAMPLES_JSON, tokenizer_identity  # noqa: E402
from entropy_probe.checkpoint import TRAINER_CONFIG, resolve_paths  # noqa: E402
from entropy_probe.errors import ProbeError  # noqa: E402
from entropy_probe.params import CheckpointParams, Params, load_params, validate_params  # noqa: E402
from entropy_probe.trainer_config import TRAINER_CONFIG_KEYS, read_trainer_config  # noqa: E402
from stages.cli import app  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LoRA tensor.*invalid shape")
REPO = Path(__file__).parent.parent


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_refused(result, out: Path, *fragments: str) -> str:
    """Exit 2, exactly one error line holding every fragment (the problem and the fix), nothing at `out`."""
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert " — " in errors[0]  # problem — fix
    assert not out.exists()
    return errors[0]


def write_params(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


# ---------------------------------------------------------------------------------------------- 1. parameters


def _float_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, bool]]:
    """(dotted key, is a list) of every field of `model` (recursively) that takes a float."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _float_fields(ann, f"{prefix}{name}.")
            continue
        members = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
        if float in members:
            out.append((prefix + name, False))
        elif any(typing.get_origin(m) is list and typing.get_args(m) == (float,) for m in members):
            out.append((prefix + name, True))
    return out


def _tree(key: str, value) -> dict:
    section, name = key.split(".")
    return {section: {name: value}}


FLOAT_FIELDS = _float_fields(Params)


def test_the_float_field_walk_finds_the_known_floats():
    keys = {k for k, _ in FLOAT_FIELDS}
    assert {
        "update.max_grad_norm",
        "checkpoint.learning_rate",
        "generation.temperature",
        "generation.top_p",
        "exact.eta_multipliers",
        "truth.eta_multipliers",
        "demo.rl_lr",
        "advantage.eps",
    } <= keys
    assert len(keys) >= 12


@pytest.mark.parametrize("key, is_list", FLOAT_FIELDS, ids=[k for k, _ in FLOAT_FIELDS])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_every_float_parameter_must_be_finite(key, is_list, bad):
    value = [1.0, bad] if is_list else bad
    with pytest.raises(ProbeError, match=f"params key '{key}'.*finite"):
        validate_params(_tree(key, value))


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("update.max_grad_norm=.nan", ("update.max_grad_norm", "finite number")),
        ("checkpoint.learning_rate=.inf", ("checkpoint.learning_rate", "finite number")),
        ("generation.temperature=.nan", ("generation.temperature", "finite number")),
        ("generation.temperature=0", ("generation.temperature", "> 0")),
        ("update.max_grad_norm=-1", ("update.max_grad_norm", "null/0 for no clipping")),
        ("exact.eta_multipliers=[1, .nan]", ("exact.eta_multipliers", "finite number")),
    ],
)
def test_bad_numbers_are_refused_by_the_cli(tmp_path, override, fragments):
    out = tmp_path / "out"
    result = cli("delta-h1", "--params", str(REPO / "params.yaml"), "-S", override, "--out", str(out))
    assert_refused(result, out, *fragments, "fix it in params.yaml or -S")


@pytest.mark.parametrize("value, expected", [("0", 0.0), ("null", None), ("auto", "auto"), ("0.5", 0.5)])
def test_max_grad_norm_off_or_positive_is_accepted(value, expected):
    assert load_params(REPO / "params.yaml", [f"update.max_grad_norm={value}"]).update.max_grad_norm == expected


# ---------------------------------------------------------------------------------------------- 2. params file


@pytest.mark.parametrize("content, kind", [("- a\n- b\n", "list"), ("42\n", "int"), ("just text\n", "str")])
@pytest.mark.parametrize("overrides", [[], ["-S", "update.rule=sgd"]], ids=["plain", "with -S"])
def test_params_file_that_is_not_a_mapping(tmp_path, content, kind, overrides):
    params = tmp_path / "params.yaml"
    params.write_text(content)
    out = tmp_path / "out"
    result = cli("verify", "--params", str(params), *overrides, "--out", str(out))
    assert_refused(result, out, str(params), f"YAML {kind}, not a mapping", "like params.yaml")


# ---------------------------------------------------------------------------------------------- shared checkpoint


@pytest.fixture(scope="module")
def trained(trainer_checkpoint) -> Path:
    """The shared tiny Trainer checkpoint (read-only: a test that damages it works on a copy_checkpoint)."""
    return trainer_checkpoint(steps=1, total_steps=2, hidden_size=32)


def copy_checkpoint(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained, dest)
    return dest


def ck_tree(path: Path, **kw) -> dict:
    return {"path": str(path), "dtype": "fp32", "device_map": "cpu", **kw}


# ---------------------------------------------------------------------------------------------- 3. adapter weights


@pytest.mark.parametrize("keep", [0, 0.5, -1], ids=["zero-byte", "half", "one-byte-short"])
def test_damaged_adapter_weights_are_refused_before_loading(trained, tmp_path, keep):
    ckpt = copy_checkpoint(trained, tmp_path / "ck")
    weights = ckpt / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)] if keep >= 0 else data[:keep])
    with pytest.raises(ProbeError, match="adapter weights .*adapter_model.safetensors are unreadable"):
        resolve_paths(CheckpointParams(**ck_tree(ckpt)))  # found while resolving paths: nothing loaded yet
    out = tmp_path / "out"
    params = write_params(tmp_path / "params.yaml", {"checkpoint": ck_tree(ckpt)})
    result = cli("verify", "--params", str(params), "--out", str(out))
    assert_refused(result, out, str(weights), "unreadable", "re-save the checkpoint")


# ---------------------------------------------------------------------------------------------- 4. tokenizer


@pytest.fixture(scope="module")
def probed(trained, tmp_path_factory):
    """verify, sample-e, sample-u and a successful delta-h1 on the tiny checkpoint; returns (root, params file)."""
    root = tmp_path_factory.mktemp("probe")
    tree = {
        "paths": {k: str(root / k) for k in ("verify", "sample_e", "sample_u", "delta_h1")},
        "checkpoint": ck_tree(trained),
        "batch_config": {"dataset_name": "arithmetic:3", "B_E": 8, "B_U": 16, "G": 4},  # some reward
        "generation": {"max_new_tokens": 3},
    }
    params = write_params(root / "params.yaml", tree)
    for stage in ("verify", "sample-e", "sample-u", "delta-h1"):
        result = cli(stage, "--params", str(params))
        assert result.exit_code == 0, result.output
    return root, params


def test_samples_record_the_tokenizer(probed, tokenizer):
    root, _ = probed
    for name, kind in (("sample_e", "samples_e"), ("sample_u", "samples_u")):
        _, meta = files.read_tensors(root / name / SAMPLES_FILE, kind)
        assert meta["tokenizer"] == tokenizer_identity(tokenizer) and meta["tokenizer"]["vocab_size"] == len(tokenizer)


def _forge_samples(root: Path, dest: Path, edit) -> None:
    """A copy of the E samples with `edit(tensors, meta)` applied."""
    tensors, meta = files.read_tensors(root / "sample_e" / SAMPLES_FILE, "samples_e")
    edit(tensors, meta)
    files.write_tensors(dest / SAMPLES_FILE, tensors, "samples_e", meta)
    shutil.copy(root / "sample_e" / SAMPLES_JSON, dest / SAMPLES_JSON)


@pytest.fixture()
def no_expensive_pass(monkeypatch):
    """delta-h1 must refuse before re-scoring or any gradient pass."""
    from entropy_probe import probe

    def reached(*args, **kwargs):
        raise AssertionError("the expensive pass was reached")

    monkeypatch.setattr(probe, "reuse_weights", reached)
    monkeypatch.setattr(probe, "compute_delta_h1", reached)


def test_token_id_beyond_the_vocabulary(probed, tmp_path, no_expensive_pass, tokenizer):
    root, params = probed
    vocab = len(tokenizer)  # the tiny model embeds exactly its tokenizer's vocabulary

    def edit(tensors, meta):
        P = tensors["input_ids"].shape[1] - tensors["logprobs"].shape[1]
        tensors["input_ids"][0, P] = vocab + 5  # the first response token of row 0 (the recorded tokenizer is right)

    _forge_samples(root, tmp_path / "e", edit)
    out = tmp_path / "out"
    result = cli("delta-h1", "--params", str(params), "-S", f"paths.sample_e={tmp_path / 'e'}", "--out", str(out))
    assert_refused(
        result,
        out,
        f"samples in {tmp_path / 'e' / SAMPLES_FILE} hold token id {vocab + 5}",
        f"the model's vocabulary has {vocab} entries",
        "another tokenizer",
        "re-run sample-e and sample-u",
    )


def test_samples_from_another_tokenizer(probed, tmp_path, no_expensive_pass):
    root, params = probed

    def edit(tensors, meta):  # every id is in range; only the recorded vocabulary differs
        meta["tokenizer"] = {"vocab_size": meta["tokenizer"]["vocab_size"], "vocab_sha256": "0" * 16}

    _forge_samples(root, tmp_path / "e", edit)
    out = tmp_path / "out"
    result = cli("delta-h1", "--params", str(params), "-S", f"paths.sample_e={tmp_path / 'e'}", "--out", str(out))
    assert_refused(result, out, "0" * 16, "another tokenizer", "re-run sample-e and sample-u")


def test_negative_token_ids_are_malformed(probed, tmp_path):
    root, params = probed
    _forge_samples(root, tmp_path / "e", lambda tensors, meta: tensors["input_ids"].__setitem__((0, 0), -3))
    out = tmp_path / "out"
    result = cli("delta-h1", "--params", str(params), "-S", f"paths.sample_e={tmp_path / 'e'}", "--out", str(out))
    assert_refused(result, out, "malformed: negative token ids", "rerun the sample-e stage")


# ---------------------------------------------------------------------------------------------- 5. pickles


class _Payload:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_shipped_params_do_not_trust_pickles():
    assert load_params(REPO / "params.yaml").checkpoint.trust_pickles is False
    assert CheckpointParams().trust_pickles is False


def test_foreign_pickle_is_not_unpickled_with_the_shipped_params(trained, tmp_path):
    ckpt = copy_checkpoint(trained, tmp_path / "foreign")
    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), ckpt / "training_args.bin")
    out = tmp_path / "verify"
    # as the README says: the shipped params.yaml with only the checkpoint path changed
    result = cli("verify", "--params", str(REPO / "params.yaml"), "-S", f"checkpoint.path={ckpt}", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    report = json.loads((out / "verify.json").read_text())
    assert all(v is None for v in report["trainer_config"].values())
    # the control: trusting the pickle does run its code, so the file above really was dangerous
    cfg = read_trainer_config(resolve_paths(CheckpointParams(**ck_tree(ckpt))), trust_pickles=True)
    assert marker.exists() and cfg["trainer_config_source"] == "training_args.bin"


def test_the_json_sidecar_is_read_first_even_when_pickles_are_trusted(trained, tmp_path):
    ckpt = copy_checkpoint(trained, tmp_path / "ck")
    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), ckpt / "training_args.bin")
    (ckpt / TRAINER_CONFIG).write_text(json.dumps({"loss_type": "grpo", "temperature": 0.5, "max_grad_norm": 2.0}))
    cfg = read_trainer_config(resolve_paths(CheckpointParams(**ck_tree(ckpt))), trust_pickles=True)
    assert not marker.exists()
    assert cfg["trainer_config_source"] == TRAINER_CONFIG
    assert (cfg["loss_type"], cfg["temperature"], cfg["max_grad_norm"], cfg["beta"]) == ("grpo", 0.5, 2.0, None)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"temperature": NaN}', "'temperature'"),
        ('{"temperature": "0.7"}', "'temperature'"),
        ('{"top_p": 1.5}', "'top_p'"),
        ('{"temprature": 0.7}', "'temprature'"),
        ("[0.7]", "holds a list"),
        ('{"temperature": 0.7', "not readable JSON"),
    ],
)
def test_bad_sidecar_is_refused(trained, tmp_path, content, fragment):
    ckpt = copy_checkpoint(trained, tmp_path / "ck")
    (ckpt / TRAINER_CONFIG).write_text(content)
    out = tmp_path / "out"
    params = write_params(tmp_path / "params.yaml", {"checkpoint": ck_tree(ckpt)})
    result = cli("verify", "--params", str(params), "--out", str(out))
    assert_refused(result, out, str(ckpt / TRAINER_CONFIG), fragment)


def test_demo_checkpoints_read_their_config_from_json_equal_to_the_pickle(small_demo, tmp_path):
    info = json.loads((small_demo / "demo.json").read_text())
    for ckpt in info["checkpoints"]:
        ckpt = Path(ckpt)
        assert (ckpt / TRAINER_CONFIG).is_file()
        from_json = read_trainer_config(resolve_paths(CheckpointParams(**ck_tree(ckpt))), trust_pickles=False)
        assert from_json["trainer_config_source"] == TRAINER_CONFIG
        without = shutil.copytree(ckpt, tmp_path / ckpt.name)
        (without / TRAINER_CONFIG).unlink()
        from_pickle = read_trainer_config(resolve_paths(CheckpointParams(**ck_tree(without))), trust_pickles=True)
        assert from_pickle["trainer_config_source"] == "training_args.bin"
        for key in TRAINER_CONFIG_KEYS:
            assert from_json[key] == from_pickle[key] and type(from_json[key]) is type(from_pickle[key]), key
        # every setting the probe uses is known, and agrees with what the demo reports it trained with
        assert all(from_json[k] is not None for k in TRAINER_CONFIG_KEYS)
        for key in set(TRAINER_CONFIG_KEYS) & set(info["grpo"]):
            assert from_json[key] == info["grpo"][key], key
