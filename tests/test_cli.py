"""The `jaxdiff` command: convert, export and info in-process; user errors exit 2 with one `jaxdiff: error:` line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from test_convert_io import _assert_bitwise_equal, _Exploit, tiny_pipeline

from jaxdiff import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("cli") / "pipe")


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert err.startswith("jaxdiff: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_convert_export_info_round_trip(tmp_path, capsys, pipeline_dir):
    code, out, _ = _run(capsys, "convert", pipeline_dir, tmp_path / "jx")
    assert code == 0
    assert "unet" in out and "UNet2DConditionModel" in out and "copied: scheduler, tokenizer" in out

    code, out, _ = _run(capsys, "info", tmp_path / "jx")
    assert code == 0 and "(jaxdiff)" in out and "AutoencoderKL" in out and "F32:" in out and "total" in out

    code, out, _ = _run(capsys, "info", "--json", tmp_path / "jx")
    described = json.loads(out)
    assert sorted(described["components"]) == ["text_encoder", "unet", "vae"]
    unet = described["components"]["unet"]
    assert unet["class"] == "UNet2DConditionModel" and unet["dtypes"] == {"F32": unet["tensors"]} and unet["params"] > 0

    code, out, _ = _run(capsys, "export", tmp_path / "jx", tmp_path / "out")
    assert code == 0 and "exported" in out
    for name in ("unet", "vae"):
        _assert_bitwise_equal(
            load_file(str(tmp_path / "out" / name / "diffusion_pytorch_model.safetensors")),
            load_file(str(pipeline_dir / name / "diffusion_pytorch_model.safetensors")),
        )

    # The diffusers folder and the jaxdiff checkpoint describe the same parameters.
    _, out, _ = _run(capsys, "info", "--json", pipeline_dir)
    original = json.loads(out)["components"]
    assert {k: v["params"] for k, v in original.items()} == {k: v["params"] for k, v in described["components"].items()}


def test_info_reports_stored_dtypes_of_a_bin_file(tmp_path, capsys):
    torch.save({"w": torch.ones(2, 3, dtype=torch.float16), "b": torch.zeros(3)}, tmp_path / "m.bin")
    code, out, _ = _run(capsys, "info", "--json", tmp_path / "m.bin")
    assert code == 0
    assert json.loads(out)["components"]["."] == {
        "weights": ["m.bin"],
        "tensors": 2,
        "params": 9,
        "dtypes": {"F16": 1, "F32": 1},
    }


def test_convert_single_file_needs_config(tmp_path, capsys, pipeline_dir):
    weights = pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors"
    code, _, err = _run(capsys, "convert", weights, tmp_path / "jx")
    _assert_one_line_error(code, err, "--config")
    code, out, _ = _run(capsys, "convert", weights, tmp_path / "jx", "--config", pipeline_dir / "vae" / "config.json")
    assert code == 0 and "AutoencoderKL" in out
    params = load_file(str(tmp_path / "jx" / "params.safetensors"))
    assert all(v.dtype == np.float32 for v in params.values()) and "decoder/conv_out/kernel" in params


def test_user_errors_exit_2_with_one_line(tmp_path, capsys, pipeline_dir):
    code, _, err = _run(capsys, "info", tmp_path / "missing")
    _assert_one_line_error(code, err, "no such file or folder", "missing")

    truncated = tmp_path / "half.safetensors"
    data = (pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    code, _, err = _run(capsys, "info", truncated)
    _assert_one_line_error(code, err, "corrupt or truncated", "half.safetensors")

    marker = tmp_path / "pwned"
    torch.save({"x": _Exploit(marker)}, tmp_path / "evil.bin")
    code, _, err = _run(
        capsys, "convert", tmp_path / "evil.bin", tmp_path / "jx", "--config", pipeline_dir / "unet" / "config.json"
    )
    _assert_one_line_error(code, err, "refused for safety", "evil.bin")
    assert not marker.exists() and not (tmp_path / "jx").exists()

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code, _, err = _run(capsys, "convert", pipeline_dir / "vae", tmp_path / "full")
    _assert_one_line_error(code, err, "already exists", "--overwrite")

    code, _, err = _run(capsys, "export", pipeline_dir, tmp_path / "out")
    _assert_one_line_error(code, err, "not a jaxdiff checkpoint")

    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "config.json").write_text(json.dumps({"_class_name": "T2IAdapter"}))
    code, _, err = _run(capsys, "convert", tmp_path / "cn", tmp_path / "jx")
    assert code == 2 and "unsupported model type 'T2IAdapter'" in err and "UNet2DConditionModel" in err


def _every_command() -> list[str]:
    """Every (sub)command path of the parser, nested ones too ("evaluate fid")."""
    import argparse

    from jaxdiff import cli

    def walk(parser, prefix):
        yield prefix
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{prefix} {name}".strip())

    return list(walk(cli.build_parser(), ""))


@pytest.mark.parametrize("command", _every_command())
def test_help_for_every_subcommand(capsys, command):
    code, out, _ = _run(capsys, *command.split(), "--help")
    assert code == 0 and "usage: jaxdiff" in out


def test_python_dash_m_jaxdiff_runs():
    out = subprocess.run([sys.executable, "-m", "jaxdiff", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "jaxdiff 0.1.0"


# ------------------------------------------------------------------------------------------- what main() catches


def _raise_in(monkeypatch, command, error):
    """Make the subcommand function `command` (e.g. "_info") raise `error`."""

    def raising(args):
        raise error

    monkeypatch.setattr(cli, command, raising)


def _user_errors():
    from jaxdiff.convert.safetensors_io import CorruptCheckpointError
    from jaxdiff.convert.table import CheckpointMismatchError
    from jaxdiff.convert.torch_io import UnsafeCheckpointError
    from jaxdiff.erase.evaluate import resolve
    from jaxdiff.errors import UserError
    from jaxdiff.sampling.text import PromptTooLongError
    from jaxdiff.train.config import ConfigError

    try:
        resolve("dog")
    except UserError as e:
        unknown_concept = e
    return [
        UserError("bad flag"),
        ConfigError("unknown config key 'x'"),
        CorruptCheckpointError("w.safetensors", "truncated"),
        UnsafeCheckpointError("evil.bin"),
        CheckpointMismatchError(["a/kernel"], where="w.safetensors"),  # lists keys, one line per kind
        PromptTooLongError("prompt is 90 tokens"),
        unknown_concept,
        FileNotFoundError("no such file: x"),
        FileExistsError("out exists"),
        PermissionError("out: permission denied"),
        IsADirectoryError("x is a folder"),
        NotADirectoryError("x is a file"),
    ]


@pytest.mark.parametrize("error", _user_errors(), ids=lambda e: type(e).__name__)
def test_each_user_error_exits_2_with_a_message_and_no_traceback(monkeypatch, capsys, error):
    _raise_in(monkeypatch, "_info", error)
    code, out, err = _run(capsys, "info")
    assert code == 2 and out == "" and err == f"jaxdiff: error: {error}\n" and "Traceback" not in err
    if "\n" not in str(error):
        _assert_one_line_error(code, err)


@pytest.mark.parametrize(
    "error", [ValueError("shapes (2, 3) and (4,) not aligned"), RuntimeError("bug"), TypeError("bug"), KeyError("k")]
)
def test_internal_errors_keep_their_traceback(monkeypatch, error):
    """A plain ValueError (e.g. a shape mismatch deep in a model) is a bug, not bad input: it is not swallowed."""

    _raise_in(monkeypatch, "_info", error)
    with pytest.raises(type(error)) as e:
        cli.main(["info"])
    assert e.value is error


def test_other_os_and_floating_point_errors_are_not_user_errors(monkeypatch):
    for error in (OSError(5, "Input/output error"), FloatingPointError("overflow in a numpy op")):
        _raise_in(monkeypatch, "_info", error)
        with pytest.raises(type(error)):
            cli.main(["info"])


def test_non_finite_stops_exit_3_with_one_line(monkeypatch, capsys):
    from jaxdiff import errors
    from jaxdiff.train.checkpoint import NonFiniteCheckpointError
    from jaxdiff.train.step import NonFiniteError

    for error in (NonFiniteError("non-finite loss at step 7"), NonFiniteCheckpointError("NaN in params/w at step 7")):
        _raise_in(monkeypatch, "_info", error)
        code, _, err = _run(capsys, "info")
        assert code == errors.EXIT_NONFINITE == 3
        assert err == f"jaxdiff: stopped: {error}\n"


def test_preempted_exits_75_from_any_command(monkeypatch, capsys):
    from jaxdiff import errors

    _raise_in(monkeypatch, "_convert", errors.Preempted(12, "runs/x"))
    code, _, err = _run(capsys, "convert", "a", "b")
    assert code == errors.EXIT_PREEMPTED == 75
    assert err.count("\n") == 1 and "preempted (SIGTERM) at step 12" in err and "runs/x" in err


def test_no_pytorch_warning_from_transformers_in_jaxdiff_commands():
    """Without torch (hidden here), importing the command and then transformers prints no advisory warning."""
    code = "import sys; sys.modules['torch'] = None; import jaxdiff.cli; import transformers"
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}  # set by jaxdiff.cli here
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0 and "PyTorch was not found" not in out.stderr + out.stdout, out.stderr
    bare = subprocess.run([sys.executable, "-c", code.replace("import jaxdiff.cli; ", "")], capture_output=True,
                          text=True, cwd=ROOT, env=env)  # fmt: skip
    assert "PyTorch was not found" in bare.stderr  # the warning exists: the first check can fail
