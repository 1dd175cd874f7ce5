"""Strict params: no YAML value is coerced (true is not 1, 2.0 is not 2, "0.5" is not 0.5), a float key takes
an int, YAML 1.2 floats (1e-5) are numbers as DVC reads them, and every finite-difference step and the
learning rate are bounded to the range where they mean what they say (docs/math.md)."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from entropy_probe.errors import ProbeError
from entropy_probe.params import MAX_LEARNING_RATE, Params, load_params, parse_override, validate_params
from stages.cli import app

REPO = Path(__file__).resolve().parents[1]


def _leaf_keys(model: type[BaseModel], kind: type, prefix: str = "") -> list[str]:
    """Dotted keys of every field of `model` (recursively) whose type is exactly `kind` (or Optional of it)."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _leaf_keys(ann, kind, f"{prefix}{name}.")
        elif ann is kind or set(typing.get_args(ann)) == {kind, type(None)}:
            keys.append(prefix + name)
    return keys


INT_KEYS = _leaf_keys(Params, int)


def _tree(key: str, value) -> dict:
    section, name = key.split(".")
    return {section: {name: value}}


def test_the_walk_finds_the_int_keys():
    assert {"batch_config.B_E", "batch_config.G", "demo.seed", "exact.max_sequences", "trajectory.B_E"} <= set(INT_KEYS)


@pytest.mark.parametrize("key", INT_KEYS)
@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_is_not_an_integer(key, value):
    with pytest.raises(ProbeError) as err:
        validate_params(_tree(key, value))
    message = str(err.value)
    assert f"params key '{key}'" in message and "boolean, not a number" in message and "\n" not in message


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("batch_config.B_E", 64.0, "without a decimal point"),
        ("batch_config.B_E", "64", "quoted value is text"),
        ("generation.top_p", "0.5", "quoted value is text"),
        ("generation.top_p", True, "boolean, not a number"),
        ("compute.all_targets", 1, "valid boolean"),
        ("compute.all_targets", "yes", "quoted value is text"),
        ("update.max_grad_norm", True, "boolean, not a number"),
        ("checkpoint.learning_rate", True, "boolean, not a number"),
    ],
)
def test_no_value_is_coerced(key, value, fragment):
    with pytest.raises(ProbeError, match=f"params key '{key}'.*{fragment}"):
        validate_params(_tree(key, value))


def test_a_float_key_takes_an_int_and_yaml_12_floats_are_numbers(tmp_path):
    assert validate_params({"generation": {"top_p": 1}}).generation.top_p == 1.0
    assert parse_override("x=1e-5") == ("x", 1e-5) and parse_override("x=-2E3") == ("x", -2000.0)
    assert parse_override('x="1e-5"') == ("x", "1e-5")  # quoted: text, refused by a float key
    params_file = tmp_path / "params.yaml"
    params_file.write_text("checkpoint:\n  learning_rate: 1e-5\nexact:\n  fd_eps: 5e-4\n")
    params = load_params(params_file)
    assert params.checkpoint.learning_rate == 1e-5 and params.exact.fd_eps == 5e-4


def test_the_shipped_params_are_valid_under_strict_types():
    assert load_params(REPO / "params.yaml") == validate_params(yaml.safe_load((REPO / "params.yaml").read_text()))


def test_a_boolean_int_is_refused_by_the_cli_in_one_line(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["sample-e", "--params", str(REPO / "params.yaml"), "-S", "batch_config.B_E=true", "--out", str(out)]
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "'batch_config.B_E'" in lines[0] and "boolean, not a number" in lines[0] and " — " in lines[0]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- ranges

FD_RANGES = {
    "exact.fd_eps": ("1e-6", "0.1"),
    "second_order.fd_eps": ("1e-4", "0.1"),
    "trajectory.fd_eps": ("1e-4", "0.1"),
}


@pytest.mark.parametrize("key", FD_RANGES)
def test_finite_difference_steps_are_bounded_to_their_valid_range(key):
    low, high = map(float, FD_RANGES[key])
    for ok in (low, high, (low * high) ** 0.5):
        section, name = key.split(".")
        assert getattr(getattr(validate_params(_tree(key, ok)), section), name) == ok
    for bad in (1e6, high * 1.01, low * 0.99, 1e-300, 0.0, -0.01):
        with pytest.raises(ProbeError) as err:
            validate_params(_tree(key, bad))
        message = str(err.value)
        assert f"params key '{key}'" in message and "must be in [{}, {}]".format(*FD_RANGES[key]) in message
        assert "docs/math.md §" in message and "fix it in params.yaml or -S" in message


def test_the_stated_ranges_are_in_docs_math():
    text = (REPO / "docs" / "math.md").read_text()
    for key, (low, high) in FD_RANGES.items():
        assert f"{key} ∈ [{low}, {high}]" in text


@pytest.mark.parametrize("value", [1e300, 1.5, 0.0, -1e-5])
def test_an_absurd_learning_rate_is_refused(value):
    with pytest.raises(ProbeError, match=r"checkpoint\.learning_rate.*a number in \(0, 1\].*not an RL fine-tuning"):
        validate_params(_tree("checkpoint.learning_rate", value))


def test_a_fine_tuning_learning_rate_is_accepted():
    for value in (1e-7, 3e-4, MAX_LEARNING_RATE):
        assert validate_params(_tree("checkpoint.learning_rate", value)).checkpoint.learning_rate == value
