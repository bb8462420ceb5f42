"""launch/tpu_pod.sh: every training flag it documents (the plans tools/aot_compile.py proved) is one the trainer's
config accepts, with a value of the right kind."""

import re
from pathlib import Path

import pytest

from jaxdiff.config import ConfigError, load_config
from jaxdiff.train import config as train_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "tpu_pod.sh"
FLAG = re.compile(r"--config\.[A-Za-z0-9_.]+=[^\s]+")


def test_the_script_documents_flags_for_several_plans():
    flags = FLAG.findall(SCRIPT.read_text())
    assert len(flags) >= 10
    assert {"--config.mesh.fsdp=16", "--config.mesh.fsdp=64", "--config.mesh.fsdp=256"} <= set(flags)


@pytest.mark.parametrize("flag", sorted(set(FLAG.findall(SCRIPT.read_text()))))
def test_every_documented_flag_is_a_valid_training_override(flag):
    config = load_config(str(ROOT / "configs" / "train" / "sd15.py"))
    if flag.startswith("--config.model.pretrained="):
        pytest.skip("a path on the user's storage")
    new = train_config.apply_overrides(config, [flag])
    key, value = flag[len("--config.") :].split("=", 1)
    node = new
    for part in key.split("."):
        node = node[part]
    assert str(node).lower() == value.lower()


def test_a_misspelt_flag_would_be_caught():
    config = load_config(str(ROOT / "configs" / "train" / "sd15.py"))
    with pytest.raises(ConfigError):
        train_config.apply_overrides(config, ["--config.train.rematt=blocks"])
