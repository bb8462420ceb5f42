"""Config errors (unknown key, mesh that does not divide the devices, batch not divisible by the data axes) give
one clear message from `jaxdiff train` before anything is compiled; overrides parse to the schema's types."""

import pytest
import train_worker as tw
from jax._src import monitoring

from jaxdiff import cli
from jaxdiff.config import load_config
from jaxdiff.train import config as config_lib


@pytest.fixture
def compiles():
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    monitoring.register_event_duration_secs_listener(listener)
    yield events
    monitoring.unregister_event_duration_listener(listener)


def _train_cli(capsys, tmp_path, *args):
    rc = cli.main(["train", "--config", tw.TINY, "--workdir", str(tmp_path / "run"), *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.usefixtures("eight_devices")  # the messages quote 8 devices
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config.optimizer.learning_rat=1e-3"],
            "unknown config key 'optimizer.learning_rat' (did you mean optimizer.learning_rate?)",
        ),
        (["--config.mesh.fsdp=3"], "mesh {data=-1, fsdp=3, tensor=1} does not divide the 8 devices"),
        (
            ["--config.mesh.data=2", "--config.mesh.fsdp=2"],
            "mesh {data=2, fsdp=2, tensor=1} needs 4 devices but there are 8",
        ),
        (
            ["--config.data.global_batch_size=12"],
            "data.global_batch_size=12 is not divisible by the data axes (data=8) = 8 devices; use a global_batch_size "
            "that is a multiple of 8",
        ),
        (
            ["--config.data.global_batch_size=16", "--config.train.accum_steps=4"],
            "data.global_batch_size=16 / train.accum_steps=4 = 4 per micro-batch is not divisible by the data axes "
            "(data=8) = 8 devices; use a global_batch_size that is a multiple of 32",
        ),
        (["--config.train.nonfinite=ignore"], "config.train.nonfinite='ignore' is not one of skip, stop"),
        (["--config.total_steps=ten"], "--config.total_steps: invalid literal for int()"),
        (["--config.mesh=4"], "--config.mesh is a group of keys (data, fsdp, tensor); set one of them"),
    ],
)
def test_config_error_is_one_clear_line_before_anything_compiles(capsys, tmp_path, compiles, args, message):
    rc, out, err = _train_cli(capsys, tmp_path, *args)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("jaxdiff: error: "), err
    assert message in err
    assert compiles == [], "something was compiled before the config was checked"
    assert not (tmp_path / "run").exists()


def test_unknown_key_set_inside_a_config_file_is_refused(capsys, tmp_path, compiles):
    path = tmp_path / "bad.py"
    path.write_text(
        "from jaxdiff.train.config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    c.optimizer.lr = 1e-4\n"
        "    c.chekpoint = dict(every_steps=1)\n"
        "    return c\n"
    )
    rc = cli.main(["train", "--config", str(path), "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "unknown config key 'chekpoint' (did you mean checkpoint?)" in err
    assert "unknown config key 'optimizer.lr'" in err
    assert compiles == []


def test_overrides_parse_to_the_schema_types_and_open_keys():
    config = config_lib.apply_overrides(
        load_config(tw.TINY + ":fsdp"),
        [
            "--config.data.shuffle=false",
            "--config.total_steps=7",
            "--config.optimizer.learning_rate=3e-4",
            "--config.model.unet.block_out_channels=(16, 32)",
            "--config.data.features=('latents',)",
            "--config.model.unet.new_key=1",
            "--config.model.pretrained=/some/path",
        ],
    )
    assert config.data.shuffle is False and config.total_steps == 7 and config.optimizer.learning_rate == 3e-4
    assert tuple(config.model.unet.block_out_channels) == (16, 32) and config.model.unet.new_key == 1
    assert tuple(config.data.features) == ("latents",) and config.model.pretrained == "/some/path"
    assert config.mesh.fsdp == -1 and config.mesh.data == 1
    validated = config_lib.validate(config, 8)
    assert validated.checkpoint.keep == 3  # defaults fill what the file leaves out


@pytest.mark.usefixtures("eight_devices")
def test_sd15_config_validates_and_builds_abstractly_on_8_devices():
    from jaxdiff.train import loop

    config = load_config("configs/train/sd15.py")
    s = loop.setup(config)  # shapes only: nothing allocated, nothing compiled
    assert s.mesh.shape["fsdp"] == 8 and s.model.num_params() > 850_000_000
    kernel = s.state_shardings.params["unet"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert kernel.spec[-1] == "fsdp"
