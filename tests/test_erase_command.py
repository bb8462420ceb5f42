"""`jaxdiff erase`: the command on the shapes model, its outputs, resumable fine-tuning, evaluation helpers, errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff import cli
from jaxdiff.erase import evaluate as ev
from jaxdiff.erase import finetune, registry
from jaxdiff.erase.config import base_config, train_block

# ------------------------------------------------------------------------------------------- evaluation


def test_resolve_names_concepts_by_any_phrasing():
    assert ev.resolve("box") == ev.Concept("box", "square", "shape")
    assert ev.resolve("Crimson").name == "red" and ev.resolve("red").kind == "colour"
    assert ev.resolve("circle").synonyms == ("disc", "round shape", "round disc")  # not "circle shape"
    with pytest.raises(ValueError, match="not a shape or colour"):
        ev.resolve("dog")


def test_prompt_sets_name_the_concept_and_keep_it_out_of_preserved():
    sets = ev.prompt_sets(ev.resolve("disc"), 12, seed=3)
    words, scenes = sets["word"]
    assert all("disc" in p for p in words) and all(s.objects[0].shape == "circle" for s in scenes)
    assert all("disc" not in p.split() for p in sets["synonyms"][0])
    assert {p for p in sets["synonyms"][0]} and all(s.objects[0].shape == "circle" for s in sets["synonyms"][1])
    assert all(s.objects[0].shape != "circle" for s in sets["preserved"][1])
    assert sets == ev.prompt_sets(ev.resolve("disc"), 12, seed=3)  # deterministic
    assert ev.prompt_sets(ev.resolve("green"), 4)["synonyms"] == ([], [])  # green has no other phrasing


def test_concept_rate_and_scene_accuracy_on_hand_built_predictions():
    concept = ev.resolve("red")
    preds = {"colour0": np.array([0, 0, 1, 2]), "shape0": np.array([0, 1, 1, 2])}
    assert ev.concept_rate(preds, concept) == 0.5
    _, scenes = ev.captions(None, 4, 0, exclude="red", kind="colour")
    truth = {
        "shape0": np.array([["circle", "square", "triangle"].index(s.objects[0].shape) for s in scenes]),
        "colour0": np.array([["red", "green", "blue", "yellow"].index(s.objects[0].colour) for s in scenes]),
    }
    assert ev.scene_accuracy(truth, scenes) == {"shape_acc": 1.0, "colour_acc": 1.0}
    all_red = {**truth, "colour0": np.zeros(4, int)}
    assert ev.scene_accuracy(all_red, scenes) == {"shape_acc": 1.0, "colour_acc": 0.0}  # no scene is red


def test_frechet_on_few_images_is_finite_and_zero_on_itself():
    rng = np.random.default_rng(0)
    f1, f2 = rng.standard_normal((8, 32)), rng.standard_normal((8, 32)) + 1.0  # N < D: singular covariances
    d = ev.frechet_distance(f1, f2)
    assert np.isfinite(d) and d > 0
    assert abs(ev.frechet_distance(f1, f1)) < 1e-3 * d


# ------------------------------------------------------------------------------------------- the loop


def _mesh(n=1):
    from jaxdiff import sharding

    return sharding.make_mesh({"fsdp": n}, jax.devices()[:n])


class _NoAxes:
    logical_axes: dict = {}
    params: dict = {}


def _quadratic(tmp_path, name, steps, total=None, log_every=None):
    """A tiny loss through the runner: resumability is independent of the model. `steps` < `total` stops early."""
    target = jnp.arange(6.0).reshape(2, 3)

    def loss(trainable, frozen, batch, rng):
        noise = 0.01 * jax.random.normal(rng, target.shape)
        return jnp.mean((trainable["w"] * batch["x"] - frozen["base"] + noise) ** 2), {}

    t = train_block(steps=steps, learning_rate=0.1)
    t.log_every = log_every or t.log_every
    batch_fn = lambda i: {"x": jnp.full((2, 3), 1.0 + 0.1 * (i % 3))}  # noqa: E731
    return finetune.run(
        [finetune.unet_network(t)],
        finetune.single_loss(loss),
        {"unet": {"w": jnp.ones((2, 3))}},
        {"base": target},
        batch_fn,
        t,
        str(tmp_path / name),
        seed=0,
        mesh=_mesh(),
        model=_NoAxes(),
        progress=False,
    )


def test_finetune_resumes_bitwise(tmp_path):
    straight, info = _quadratic(tmp_path, "a", 6)
    assert info["resumed_from"] == 0
    _quadratic(tmp_path, "b", 3)  # a run that stopped after 3 steps (kill -9 is tested in test_runner_faults.py)
    resumed, info = _quadratic(tmp_path, "b", 6)
    assert info["resumed_from"] == 3
    np.testing.assert_array_equal(np.asarray(straight.params["unet"]["w"]), np.asarray(resumed.params["unet"]["w"]))
    assert not np.allclose(np.asarray(straight.params["unet"]["w"]), 1.0)  # it trained
    assert (tmp_path / "b" / "metrics.jsonl").read_text().count("\n") >= 1


def test_finetune_reports_initial_and_final_loss_and_parameter_change(tmp_path):
    from jaxdiff.erase.run import markdown, summary

    state, info = _quadratic(tmp_path, "a", 6, log_every=2)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert info["loss_initial"] == {"step": 2, "loss": rows[0]["loss"]}
    assert info["loss_final"] == {"step": 6, "loss": rows[-1]["loss"]} and info["loss_final"]["loss"] < rows[0]["loss"]
    moved = np.linalg.norm(np.asarray(state.params["unet"]["w"]) - 1.0)
    assert isinstance(info["delta_norm"], float) and info["delta_norm"] == pytest.approx(moved, rel=1e-5) and moved > 0
    report = {"method": "esd", "concept": "circle", "model": "shapes", "preserve": "", "prompts": {}}
    report.update(cost={"seconds": 1.0, "peak_rss_gb": 0.1}, info=info)
    for text in (summary(report), markdown(report)):
        assert f"loss {rows[0]['loss']:.4g} (step {rows[0]['step']}) -> " in text and "‖Δθ‖" in text


def test_finetune_stops_on_non_finite_loss_naming_it(tmp_path):
    def loss(trainable, frozen, batch, rng):
        return jnp.sum(trainable["w"]) * jnp.log(batch["x"]), {}

    t = train_block(steps=2, learning_rate=0.1)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        finetune.run(
            [finetune.unet_network(t)],
            finetune.single_loss(loss),
            {"unet": {"w": jnp.ones(3)}},
            {},
            lambda i: {"x": jnp.float32(-1.0)},
            t,
            str(tmp_path),
            seed=0,
            mesh=_mesh(),
            model=_NoAxes(),
            progress=False,
        )


def test_sharded_finetune_matches_one_device(tmp_path):
    """Concept Ablation's loss on a tiny UNet, 2 real updates: fsdp over 8 devices gives the single-device gradients
    (metrics, Adam's moments) and params."""
    from jaxdiff import sharding
    from jaxdiff.erase import ablation, common
    from jaxdiff.models import unet
    from jaxdiff.models.model import create

    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    model = create(unet.ARCHITECTURES["UNet2DConditionModel"], config, abstract=False, attention="einsum", seed=0)
    loss = ablation.make_loss(model)
    rng = np.random.default_rng(0)
    batch = {
        "latents": jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32),
        "target": jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.float32),
        "anchor": jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.float32),
    }
    t = train_block(steps=2, learning_rate=1e-3, selector="cross-attn-kv")
    t.log_every = 1
    assert float(finetune.schedule(t)(0)) > 0  # no warm-up from 0: both steps update the params
    trainable, _ = common.split(model.params, "cross-attn-kv")
    results, states, metrics = {}, {}, {}
    for name, mesh in (("one", _mesh(1)), ("fsdp", sharding.make_mesh({"fsdp": 8}))):
        state, _ = finetune.run(
            [finetune.unet_network(t)],
            finetune.single_loss(loss),
            {"unet": trainable},
            {"base": model.params},
            lambda i: batch,
            t,
            str(tmp_path / name),
            seed=0,
            mesh=mesh,
            model=model,
            progress=False,
        )
        results[name], states[name] = state.params["unet"], jax.device_get(state)
        metrics[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    # Every trained leaf moved far beyond the tolerance below before the two runs are compared.
    for a, b in zip(jax.tree_util.tree_leaves(results["one"]), jax.tree_util.tree_leaves(trainable)):
        assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 100 * 1e-6
    assert [m["step"] for m in metrics["one"]] == [m["step"] for m in metrics["fsdp"]] == [1, 2]
    for key in ("loss", "grad_norm", "learning_rate"):  # the gradients, step by step
        np.testing.assert_allclose([m[key] for m in metrics["fsdp"]], [m[key] for m in metrics["one"]], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(results["one"]), jax.tree_util.tree_leaves(results["fsdp"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for a, b in zip(
        jax.tree_util.tree_leaves(states["one"].opt_state), jax.tree_util.tree_leaves(states["fsdp"].opt_state)
    ):
        # Adam's moments (sums of the gradients), to 1e-5 of each leaf's largest: a near-zero entry is a sum of
        # cancelling terms whose rounding differs with the reduction order.
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.max(np.abs(b)))
    kernel = common.flatten(results["fsdp"])[
        ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "to_k", "kernel")
    ]
    shard = kernel.addressable_shards[0].data
    assert shard.size < kernel.size  # the trainable K/V leaves are sharded over fsdp
    assert not np.allclose(
        np.asarray(results["one"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"]),
        np.asarray(
            common.flatten(model.params)[
                ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "to_k", "kernel")
            ]
        ),
    )


def test_learning_rate_schedules():
    t = train_block(steps=100, learning_rate=1.0)
    t.update(lr_schedule="cosine_with_restarts", lr_cycles=2, warmup_steps=10)
    lr = finetune.schedule(t)
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1.0)
    assert float(lr(54)) < 0.01 and float(lr(55)) == pytest.approx(1.0)  # restart after 45 of 90 decay steps
    t.lr_schedule = "bogus"
    with pytest.raises(ValueError, match="schedule must be one of"):
        finetune.schedule(t)
    assert isinstance(finetune.optimizer(train_block(1, 1e-3, optimizer="adamw"), 1e-3), optax.GradientTransformation)


# ------------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def uce_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("erase") / "uce"
    argv = [
        "erase",
        "--config",
        "configs/erase/uce.py",
        "--config.concept=circle",
        "--config.preserve=square",
        "--config.eval.num_images=4",
        "--config.eval.steps=4",
        "--out",
        str(out),
        "--no-progress",
    ]
    # A typo first: refused before anything is written, so the corrected command below is not refused.
    assert cli.main([a if a != "--config.concept=circle" else "--config.concept=dog" for a in argv]) == 2
    assert not out.exists()
    assert cli.main(argv) == 0
    return out, argv


def test_erase_command_writes_model_grid_and_report(uce_run):
    from jaxdiff.erase import common
    from jaxdiff.sampling.pipeline import load_pipeline

    out, _ = uce_run
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "uce" and report["kind"] == "shape"
    assert set(report["erasure"]) == {"word", "synonyms", "heldout"}
    word = report["erasure"]["word"]
    assert word["n"] == 4 and {"erased", "invalid", "probe_only", "reasons", "floor"} <= set(word)
    for fig in ("erased", "invalid", "probe_only"):
        r = word[fig]["after"]
        assert 0.0 <= r["rate"] <= 1.0 and r["n"] == 4 and r["ci"][0] <= r["rate"] <= r["ci"][1]
    assert word["erased"]["after"]["k"] + word["invalid"]["after"]["k"] <= 4  # an invalid image is never erased
    p = report["preservation"]
    assert {"preserved", "erased_prompts", "chance", "paired_distance", "frechet", "frechet_floor"} <= set(p)
    assert set(p["preserved"]) == {"shape", "colour"} and p["erased_prompts"]["attribute"] == "colour"
    assert {"normalised_erasure", "preservation", "joint", "floor_gap"} <= set(report["scores"])
    assert isinstance(report["warnings"], list) and report["preserve"] == "square" and not report["preserve_default"]
    assert report["cost"]["seconds"] > 0 and report["cost"]["peak_rss_gb"] > 0
    # configs/erase/uce.py named without a variant on the built-in model: its calibrated :shapes preset ran.
    config = json.loads((out / "config.json").read_text())
    assert config["uce"]["edit_tokens"] == "last_word_to_end" and config["num_prompts"] == 8
    md = (out / "report.md").read_text()
    assert "| word | 4 |" in md and "Normalised erasure" in md and "Joint score" in md
    assert (out / "before_after.png").stat().st_size > 1000

    edited, original = load_pipeline(out / "model"), load_pipeline("shapes")
    changed = [
        p
        for p, a in common.flatten(edited.unet.params).items()
        if not np.array_equal(np.asarray(a), np.asarray(common.flatten(original.unet.params)[p]))
    ]
    assert changed and all("attn2" in p and p[-2] in ("to_k", "to_v") for p in changed)  # UCE edits K/V only


def test_a_method_named_without_a_variant_takes_the_built_in_model_s_preset():
    assert cli.model_preset("configs/erase/esd.py", "shapes") == "configs/erase/esd.py:shapes"
    assert cli.model_preset("configs/erase/esd.py:paper", "shapes") is None  # a named variant is kept
    assert cli.model_preset("configs/erase/esd.py", "/models/sd15") is None  # SD: the official defaults


def test_erased_model_exports_to_diffusers(uce_run, tmp_path):
    out, _ = uce_run
    assert cli.main(["export", str(out / "model"), str(tmp_path / "diffusers")]) == 0
    assert (tmp_path / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "diffusers" / "tokenizer").is_dir()


def test_erase_on_a_diffusers_folder_writes_a_loadable_jaxdiff_model(uce_run, tmp_path):
    """A model without a probe: the edit, the model folder and the grid, no figures."""
    from jaxdiff.sampling.pipeline import load_pipeline

    out, _ = uce_run
    assert cli.main(["export", str(out / "model"), str(tmp_path / "src")]) == 0
    argv = [
        "erase",
        "--config",
        "configs/erase/uce.py",
        "--config.concept=circle",
        "--config.eval.num_images=2",
        "--config.eval.steps=2",
        "--model",
        str(tmp_path / "src"),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "erasure" not in report and "No probe" in (tmp_path / "out" / "report.md").read_text()
    assert report["preserve_default"] and "a person" in report["preserve"]  # no --config.preserve: common concepts
    assert json.loads((tmp_path / "out" / "config.json").read_text())["preserve"] == "auto"
    pipe = load_pipeline(tmp_path / "out" / "model")  # a jaxdiff checkpoint with the source's tokenizer/scheduler
    assert pipe(["circle"], steps=2, guidance=1.0).shape == (1, 32, 32, 3)


def test_erase_refuses_an_output_folder_of_another_config(uce_run, capsys):
    out, argv = uce_run
    other = [a if not a.startswith("--config.preserve") else "--config.preserve=triangle" for a in argv]
    assert cli.main(other) == 2
    assert "different config" in capsys.readouterr().err


BAD_CONFIGS = [
    ("uce.py:runlocal", "--config.concept=dog", "not a shape or colour"),
    ("uce.py:runlocal", "--config.bogus=1", "unknown config key"),
    ("uce.py:runlocal", "--config.concept=", "concept is empty"),
    ("uce.py:runlocal", "--config.concept=circle;dog --config.num_prompts=2", "'dog' is not a shape"),
    ("uce.py:runlocal", "--config.preserve=square;dog --config.num_prompts=2", "'dog' is not a shape"),
    ("uce.py:runlocal", "--config.eval.scheduler=bogus", "config.eval.scheduler='bogus' is unknown"),
    ("uce.py:runlocal", "--config.method=bogus", "unknown erasure method"),
    ("uce.py:runlocal", "--config.model=/no/such/model", "no model at /no/such/model"),
    ("ablation.py:runlocal", "--config.anchor=", "ablation needs an anchor concept"),
    ("uce.py:bogus", "", "unknown uce config variant 'bogus'"),  # raised by the config file itself
    ("esd.py:runlocal", "--config.esd.sampler=bogus", "sampler must be one of"),  # raised by the method itself
    ("uce.py:runlocal", "--config.uce.technique=bogus", "unknown UCE technique 'bogus'"),
    ("spm.py:runlocal", "--config.train.retain_weight=1", "retain_weight applies to the methods that fine-tune"),
]


@pytest.mark.parametrize("config, overrides, message", BAD_CONFIGS)
def test_erase_bad_config_is_one_line_error_and_writes_nothing(tmp_path, capsys, config, overrides, message):
    out = tmp_path / "x"
    argv = ["erase", "--config", f"configs/erase/{config}", *overrides.split(), "--out", str(out)]
    assert cli.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("jaxdiff: error: ") and err.count("\n") == 1, err
    assert sorted(tmp_path.iterdir()) == []  # no OUT/config.json: the corrected rerun will not be refused

    # With --overwrite, an existing OUT is left as it was (and no staging folder is made).
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert cli.main([*argv, "--overwrite", "--no-progress"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"] and sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_erase_overwrite_replaces_the_old_output_only_once_the_new_one_is_complete(
    uce_run, tmp_path, monkeypatch, capsys
):
    from jaxdiff.erase import run, uce

    old, argv = uce_run
    out = tmp_path / "out"
    shutil.copytree(old, out)
    files = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    other = [a if not a.startswith("--config.preserve") else "--config.preserve=triangle" for a in argv]
    other[other.index("--out") + 1] = str(out)

    def killed(job, result):  # the process dies after the edit, before the new outputs are written
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "_save_outputs", killed)
    assert cli.main([*other, "--overwrite"]) == 130
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == files  # the old run is whole
    staging = run.staging_folder(out)
    assert json.loads((staging / "config.json").read_text())["preserve"] == "triangle"
    assert cli.main(other) == 2 and "different config" in capsys.readouterr().err  # without --overwrite: refused

    # Stands for the fine-tuning checkpoints of the killed run: the rerun must work in (resume from) the staging folder.
    (staging / "train").mkdir()
    (staging / "train" / "step_5").write_text("checkpoint")
    monkeypatch.undo()
    seen = []
    method = uce.run  # the registry calls the module's `run` at call time
    monkeypatch.setattr(uce, "run", lambda job: seen.append((job.out, (job.out / "train").exists())) or method(job))
    assert cli.main([*other, "--overwrite"]) == 0
    assert seen == [(staging, True)]
    assert json.loads((out / "report.json").read_text())["preserve"] == "triangle"
    assert json.loads((out / "config.json").read_text())["preserve"] == "triangle"
    assert (out / "train" / "step_5").read_text() == "checkpoint" and (out / "model" / "jaxdiff.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, tmp or old folder left


def test_every_method_config_loads_and_names_a_known_method():
    from jaxdiff.config import load_config

    for name, info in registry.methods().items():
        c = load_config(f"configs/erase/{name}.py:runlocal")
        assert c.method == name and set(base_config(name).eval) == set(c.eval)
        if info.selector is not None:  # the declared default is the config's
            assert load_config(f"configs/erase/{name}.py").train.selector == info.selector, name


METHOD_NAMES = ["uce", "rece", "mace", "trce", "esd", "spm", "all_but_one", "ablation", "doco"]


def test_registry_finds_the_nine_methods_in_display_order():
    from jaxdiff.erase import uce
    from jaxdiff.errors import UserError

    found = registry.methods()
    assert list(found) == METHOD_NAMES  # finetune.py has a `run` but no METHOD: not a method
    assert all(info.name == name and info.module.__name__ == f"jaxdiff.erase.{name}" for name, info in found.items())
    assert registry.get("uce").module is uce and registry.get("uce").kind == "closed_form"
    assert [n for n, i in found.items() if i.needs_anchor] == ["ablation", "doco"]
    with pytest.raises(UserError, match="unknown erasure method 'bogus'; choose from uce, rece, mace"):
        registry.get("bogus")


def test_the_retention_flag_is_declared_by_exactly_the_methods_that_add_the_retain_term():
    import inspect

    from jaxdiff.config import load_config
    from jaxdiff.erase import run as erase_run
    from jaxdiff.errors import UserError

    found = registry.methods()
    calls = {n for n, i in found.items() if "train_selected(" in inspect.getsource(i.module)}
    assert {n for n, i in found.items() if i.retention} == calls == {"trce", "esd", "all_but_one", "ablation"}
    for name, info in found.items():  # refused up front (before the model loads) exactly where it would be ignored
        config = load_config(f"configs/erase/{name}.py:runlocal")
        if "train" not in config:  # closed-form: --config.train.retain_weight is an unknown key there
            assert not info.retention
            continue
        config.anchor, config.train.retain_weight = "square", 1.0
        if info.retention:
            erase_run._validate(config)
        else:
            with pytest.raises(UserError, match=f"retain_weight applies .* not to {name}; drop it"):
                erase_run._validate(config)


NEW_METHOD = """\"\"\"A method added by dropping its module into the package.\"\"\"

from jaxdiff.erase.registry import MethodInfo

METHOD = MethodInfo(kind="finetune", order=55, selector="esd-u", needs_anchor=True, anchor="other_concept")


def run(job):
    return "ran"
"""


def test_a_module_dropped_into_the_package_is_a_method(tmp_path, monkeypatch):
    """A new module with METHOD and run(job) is found, in its place, with nothing else to register: the package's
    search path gets a folder holding only the new file, so the checkout is not touched."""
    import sys

    import jaxdiff.erase

    (tmp_path / "zz_new_method.py").write_text(NEW_METHOD)
    (tmp_path / "zz_helper.py").write_text("def run(job):\n    return 'not a method: no METHOD'\n")
    monkeypatch.setattr(jaxdiff.erase, "__path__", [*jaxdiff.erase.__path__, str(tmp_path)])
    registry.clear_cache()
    try:
        found = registry.methods()
        assert list(found) == [*METHOD_NAMES[:5], "zz_new_method", *METHOD_NAMES[5:]]  # order 55: after esd
        info = registry.get("zz_new_method")
        assert info.needs_anchor and info.selector == "esd-u" and info.module.run(None) == "ran"
    finally:  # the later tests see the package as it is
        monkeypatch.undo()
        for name in ("zz_new_method", "zz_helper"):
            sys.modules.pop(f"jaxdiff.erase.{name}", None)
            vars(jaxdiff.erase).pop(name, None)
        registry.clear_cache()
    assert list(registry.methods()) == METHOD_NAMES


def test_method_info_refuses_unknown_kinds_and_anchors():
    with pytest.raises(ValueError, match="kind"):
        registry.MethodInfo(kind="magic", order=1)
    with pytest.raises(ValueError, match="anchor"):
        registry.MethodInfo(kind="finetune", order=1, anchor="elsewhere")
    with pytest.raises(ValueError, match="needs an anchor"):
        registry.MethodInfo(kind="finetune", order=1, needs_anchor=True)


def test_scorecard_reads_methods_and_anchors_from_the_registry():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "erasure_scorecard.py"
    spec = importlib.util.spec_from_file_location("erasure_scorecard", path)
    scorecard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scorecard)
    anchors = {
        m: [a for a in scorecard.cell_args(m, "circle") if a.startswith("--config.anchor=")] for m in METHOD_NAMES
    }
    assert anchors == {
        **{m: [] for m in METHOD_NAMES},
        "trce": ["--config.anchor=shape"],  # the generic word of the target's kind
        "ablation": ["--config.anchor=square"],  # the first other concept of its kind
        "doco": ["--config.anchor=square"],
    }
