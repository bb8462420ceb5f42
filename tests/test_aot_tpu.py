"""Ahead-of-time compilation of the trainer's step for a TPU topology on this CPU host (libtpu, no TPU chips)."""

import importlib.util
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "aot_compile.py"

if importlib.util.find_spec("libtpu") is None:
    pytest.skip(
        "libtpu is not installed, so XLA:TPU cannot compile here: pip install -c constraints.txt -e '.[tpu-aot]' "
        "(tools/test.sh installs it unless the download fails)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def aot():
    import jax

    spec = importlib.util.spec_from_file_location("aot_compile", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    # An executable compiled for TPU topology devices cannot be loaded back from the persistent cache (this process
    # has no TPU client: jax warns and recompiles), so none is written there.
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    yield module
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)


def _compile(aot, *flags):
    # configs/train/unet_tiny.py as it is (no EMA), bf16, 8x8 latents, a global batch of 8.
    return aot.run(aot.parse_args(["--topology", "v5e:2x2", "--model", "tiny", "--batch", "8", "--no-ema", *flags]))


@pytest.fixture(scope="module")
def four(aot):
    return _compile(aot, "--mesh", "fsdp=4")


def test_fsdp_over_four_chips_cuts_per_chip_argument_bytes_to_a_quarter(aot, four):
    one = _compile(aot, "--devices", "1", "--mesh", "fsdp=1")
    assert four["platform"] == one["platform"] == "tpu" and four["chip"] == "v5e"
    assert four["devices"] == 4 and four["mesh"]["fsdp"] == 4 and one["devices"] == 1
    assert "platform tpu" in four["notes"][0]  # the model was built for TPU, not for this host's CPU
    # Params, AdamW moments and the batch: all but the replicated norms and the step counter split four ways.
    ratio = four["argument_bytes"] / one["argument_bytes"]
    assert ratio <= 1.15 / 4, f"fsdp=4 holds {ratio:.3f} of one chip's argument bytes"
    assert 0 < four["flops_per_device"] < 0.5 * one["flops_per_device"]  # the batch's compute is split too
    assert four["fits"] and 0 < four["peak_bytes"] < four["hbm_capacity_bytes"]


def test_the_sampling_program_compiles_with_its_batch_split_over_the_chips(aot):
    """--task sample: the pipeline's own compiled loop (CFG rows, `--steps` UNet calls, the VAE decode)."""
    flags = ["--topology", "v5e:2x2", "--model", "tiny", "--task", "sample", "--mesh", "data=4", "--batch", "4"]
    r = aot.run(aot.parse_args([*flags, "--steps", "2"]))
    assert r["platform"] == "tpu" and r["devices"] == 4 and r["mesh"]["data"] == 4
    assert r["fits"] and r["flops_per_device"] > 0 and r["output_bytes"] > 0
    # --weights bf16: the params held in bf16, as inference loads them: the replicated weights dominate the
    # arguments (latents, text embeddings and the plan are a few KiB), so their bytes halve.
    half = aot.run(aot.parse_args([*flags, "--steps", "2", "--weights", "bf16"]))
    assert (r["weights"], half["weights"]) == ("float32", "bfloat16")
    assert 0.49 <= half["argument_bytes"] / r["argument_bytes"] <= 0.52
    assert half["program_sha256"] != r["program_sha256"]
    with pytest.raises(SystemExit, match="only sampling holds its params"):
        aot.run(aot.parse_args(["--topology", "v5e:2x2", "--model", "tiny", "--weights", "bf16"]))


def test_opt_level_o0_compiles_the_same_program_at_xlas_lowest_level(aot, four):
    """--opt-level changes how XLA:TPU compiles, not what: the same lowered program and arguments; the level is
    recorded and jax's setting restored after."""
    import jax

    fast = _compile(aot, "--mesh", "fsdp=4", "--opt-level", "O0")
    assert (fast["opt_level"], four["opt_level"]) == ("O0", "default")
    assert fast["program_sha256"] == four["program_sha256"]
    assert fast["argument_bytes"] == four["argument_bytes"] and fast["fits"]
    # It compiled differently: at O0 XLA:TPU emits no asynchronous prefetches (less code, fewer bytes moved).
    assert (
        fast["code_bytes"] < four["code_bytes"]
        and 0 < fast["bytes_accessed_per_device"] < four["bytes_accessed_per_device"]
    )
    assert jax.config.jax_optimization_level == "UNKNOWN"
    assert ", XLA O0" in aot.report(fast).splitlines()[0]
