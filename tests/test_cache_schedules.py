"""Feature caches (Faster Diffusion, DeepCache, T-GATE): the UNet split is exact, degenerate schedules are plain
sampling, each schedule's per-step reuse pattern and recorded UNet call trace match the official code's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_unet import TINY_CONFIGS

from jaxdiff import cli
from jaxdiff.errors import UserError
from jaxdiff.models.model import create
from jaxdiff.models.unet import ARCHITECTURES, num_skips
from jaxdiff.sampling import cache, make_scheduler
from jaxdiff.sampling.denoise import denoise

UNET = ARCHITECTURES["UNet2DConditionModel"]
SCHED = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1)
CONFIGS = {"sd1": TINY_CONFIGS["sd1"], "sdxl": TINY_CONFIGS["sdxl"]}


@functools.cache
def _random_unet(name):
    """(name, model, params): the tiny config's UNet with random weights everywhere (diffusers' zero-initialised
    conv_out would hide differences); built once per module run for every test that needs it."""
    model = create(UNET, CONFIGS[name], abstract=False, seed=3)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape).astype(np.float32) * 0.2), model.params
    )
    return name, model, params


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def unet(request):
    return _random_unet(request.param)


def _inputs(name, batch=2, size=8):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 4)).astype(np.float32))
    context = jnp.asarray(rng.standard_normal((batch, 7, 24)).astype(np.float32))
    added = None
    if name == "sdxl":
        added = {
            "text_embeds": jnp.asarray(rng.standard_normal((batch, 20)).astype(np.float32)),
            "time_ids": jnp.tile(jnp.asarray([[64.0, 64, 0, 0, 64, 64]]), (batch, 1)),
        }
    return x, context, added


def _split_outputs(module, params, x, t, context, added, branches):
    """One compiled program: the UNet, decode(encode), decode at given and moved timesteps, and per DeepCache
    branch the full call's output, the shallow call's from its cached feature and from a moved feature."""

    def run(params, x, t, context):
        apply = lambda *a, **k: module.apply({"params": params}, *a, **k)  # noqa: E731
        f = apply(x, t, context, added, method="encode")
        out = {
            "full": apply(x, t, context, added),
            "split": apply(f, context, method="decode"),
            "decode_t": apply(f, context, t, added, method="decode"),
            "decode_moved_t": apply(f, context, t + 300.0, added, method="decode"),
        }
        for k in branches:
            out[f"deep{k}"], feature = apply(x, t, context, added, branch=k, method="deep_feature")
            out[f"shallow{k}"] = apply(x, t, context, feature, added, branch=k, method="shallow")
            out[f"moved{k}"] = apply(x, t, context, feature + 1.0, added, branch=k, method="shallow")
        return out

    return jax.tree_util.tree_map(np.asarray, jax.jit(run)(params, x, t, context))


def test_decoder_of_encoder_and_every_shallow_branch_equal_the_unet_bitwise(unet):
    name, model, params = unet
    x, context, added = _inputs(name)
    branches = range(num_skips(model.config)) if name == "sd1" else []  # sdxl: the split and its text_time
    out = _split_outputs(model.module, params, x, jnp.asarray([10.0, 901.0]), context, added, branches)
    full = out["full"]
    np.testing.assert_array_equal(out["split"], full)
    # The decoder with its own timesteps (Faster Diffusion's non-key steps), at the encoder's timesteps ...
    np.testing.assert_array_equal(out["decode_t"], full)
    assert np.max(np.abs(out["decode_moved_t"] - full)) > 1e-3  # ... and it does read them
    for k in branches:
        np.testing.assert_array_equal(out[f"deep{k}"], full)
        np.testing.assert_array_equal(out[f"shallow{k}"], full, err_msg=f"branch {k}")
        assert np.max(np.abs(out[f"moved{k}"] - full)) > 1e-4, f"branch {k} ignores the cached feature"


def test_the_shapes_unet_splits_exactly():
    from jaxdiff.sampling.pipeline import load_pipeline

    pipe = load_pipeline("shapes")
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 8, 4)).astype(np.float32))
    context, _ = pipe.encode_prompts(["a red circle", "a blue square"])
    out = _split_outputs(pipe.unet.module, pipe.unet.params, x, jnp.asarray([999.0, 321.0]), context, None, [0])
    for key in ("split", "decode_t", "deep0", "shallow0"):
        np.testing.assert_array_equal(out[key], out["full"], err_msg=key)


# --------------------------------------------------------------------------- schedules vs the official code

DDIM50 = make_scheduler("ddim", SCHED).plan(50).timesteps  # 981, 961, ..., 1


def test_faster_diffusion_50ls_is_the_papers_key_steps_and_groups():
    s = cache.parse("faster:50ls", DDIM50)
    # distill_metrics.md 2.2: key = {0, 1, 2, 3, 5, 10, 15, 25, 35}; groups [0],[1],[2],[3,4],[5-9],...,[35-49]
    assert [i for i, k in enumerate(s.key) if k] == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    assert [size for _, size in s.groups] == [1, 1, 1, 2, 5, 5, 10, 10, 15]
    assert s.encoder_passes() == 9
    # Prior noise injection before every scheduler step with t / 1000 < 0.5: t = 481 is step 25.
    assert s.alpha == 0.003
    assert [i for i, j in enumerate(s.inject) if j] == list(range(25, 50))
    assert cache.parse("faster:50ls:inject=0", DDIM50).inject == (False,) * 50


@pytest.mark.parametrize(
    "spec,steps,keys",
    [
        ("faster:every2", 10, [0, 2, 4, 6, 8]),
        ("faster:every4", 10, [0, 4, 8]),
        ("faster:0,1,2,5", 8, [0, 1, 2, 5]),
        ("faster:pro", 30, [0, 2, 5, 9, 14, 20, 27]),  # 9 + 8 i a perfect square
        ("faster:s2", 50, [*range(20), *range(20, 41, 2), *range(41, 50)]),
        ("faster:100ls", 100, sorted({*range(10), *range(86, 100), *range(0, 100, 5)})),
    ],
)
def test_faster_diffusion_presets(spec, steps, keys):
    s = cache.parse(spec, np.linspace(999, 0, steps))
    assert [i for i, k in enumerate(s.key) if k] == keys


# T-GATE's tgate_scheduler(cur_step=i, gate_step=10, sp_interval=5, fi_interval=1, warm_up=2), written out:
# C compute, S store (cache), R reuse, M store the mean of the CFG halves; "-" = no CFG from the gate on.
TGATE_10_OF_14 = [
    ("C", "C"),  # 0  warm-up
    ("C", "C"),  # 1  warm-up
    ("S", "C"),  # 2  == warm_up: cache self-attention
    ("R", "C"),  # 3
    ("R", "C"),  # 4
    ("S", "C"),  # 5  % sp_interval == 0
    ("R", "C"),  # 6
    ("R", "C"),  # 7
    ("R", "C"),  # 8
    ("M", "M"),  # 9  gate_step - 1: both cached, keep_shape=False
    ("S", "R", "-"),  # 10 fidelity-improving: cross-attention reused, no CFG
    ("S", "R", "-"),
    ("S", "R", "-"),
    ("S", "R", "-"),
]
LETTER = {"compute": "C", "store": "S", "reuse": "R", "store_mean": "M"}


def test_tgate_pattern_is_the_official_scheduler():
    s = cache.parse("tgate:10", np.linspace(999, 0, 14))
    got = [(LETTER[a], LETTER[b]) + (() if c else ("-",)) for (a, b), c in zip(s.attn, s.cfg)]
    assert got == TGATE_10_OF_14
    fi2 = cache.parse("tgate:3:fi=2:warmup=0:sp=1", np.linspace(999, 0, 6))
    assert [LETTER[a] for a, _ in fi2.attn] == ["S", "S", "M", "R", "S", "R"]


def test_deepcache_pattern_is_uniform_every_n():
    s = cache.parse("deepcache:3:branch=1", np.linspace(999, 0, 8), num_skips=4)
    assert s.pattern() == ["full", "shallow", "shallow", "full", "shallow", "shallow", "full", "shallow"]
    assert s.branch == 1 and s.encoder_passes() == 3


@pytest.mark.parametrize(
    "spec,message",
    [
        ("bogus", "unknown cache"),
        ("fast:50ls", "unknown cache method 'fast'"),
        ("faster:60ls", "unknown Faster Diffusion preset '60ls'"),
        ("faster:50ls", "preset 50ls is for 50 steps, this run has 10"),
        ("faster:0,3,12", "key steps must lie in 0..9"),
        ("faster:every0", "must be a positive integer"),
        ("faster:every2:alpha=1", "unknown option 'alpha=1'"),
        ("faster:every2:decode=fast", "decode must be one of auto, parallel, sequential"),
        ("deepcache:0", "must be a positive integer"),
        ("deepcache:11", "longer than the run"),
        ("deepcache:2:branch=4", "branch must lie in 0..3"),
        ("tgate:11", "gate step 11 lies outside the run (10 steps)"),
        ("tgate:5:sp=x", "sp must be a number"),
    ],
)
def test_bad_cache_strings_are_one_clear_error(spec, message):
    with pytest.raises(UserError, match=None) as e:
        cache.parse(spec, np.linspace(999, 0, 10), num_skips=4)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_generate_refuses_a_bad_cache_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["generate", "a red circle", "--steps", "10", "--cache", "tgate:20", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "gate step 20 lies outside the run" in err and len(err.splitlines()) == 1
    assert not out.exists()


# -------------------------------------------------------------- compiled loops: equivalence and call traces


class Recording(cache.CachedUNet):
    """Logs each executed UNet call (name, batch, first timestep) from inside the compiled loop."""

    def _log(self, what, t, batch):
        jax.debug.callback(lambda t: LOG.append((what, batch, float(np.ravel(t)[0]))), t, ordered=True)

    def encode(self, x, t, cond):
        self._log("encode", t, x.shape[0])
        return super().encode(x, t, cond)

    def decode(self, features, t, cond):
        batch = features["skips"][0].shape[0]
        self._log("decode", features["emb"][:, 0] if t is None else t, batch)
        return super().decode(features, t, cond)

    def deep(self, x, t, cond, branch):
        self._log("full", t, x.shape[0])
        return super().deep(x, t, cond, branch)

    def shallow(self, x, t, cond, feature, branch):
        self._log("shallow", t, x.shape[0])
        return super().shallow(x, t, cond, feature, branch)

    def gated(self, x, t, cond, c, modes):
        self._log("".join(LETTER[m] for m in modes), t, x.shape[0])
        return super().gated(x, t, cond, c, modes)


LOG = []


def _trace():
    """The log in execution order (ordered callbacks)."""
    return list(LOG)


def _sample(name, model, params, scheduler, steps, spec, guidance=4.0, recording=False):
    x, context, added = _inputs(name)
    rng = np.random.default_rng(5)
    uncond_ctx = jnp.asarray(rng.standard_normal(context.shape).astype(np.float32))
    cond, uncond = (context, added), (uncond_ctx, added)
    sched = make_scheduler(scheduler, SCHED)
    plan = sched.plan(steps)
    schedule = cache.parse(spec, np.asarray(plan.timesteps), num_skips(model.config))
    kind = Recording if recording else cache.CachedUNet

    # Params as arguments, as the pipeline passes them: closed over, XLA would constant-fold them differently in
    # each program and plain vs cached would differ in the last bits.
    @jax.jit
    def fn(params, x, cond, uncond):
        return denoise(kind(model.module, params), sched, plan, x, cond, uncond, guidance, cache=schedule)

    out = np.asarray(fn(params, x * plan.init_noise_sigma, cond, uncond))
    jax.effects_barrier()  # every recorded callback has run
    return out, plan


@pytest.fixture(scope="module")
def sd1():
    return _random_unet("sd1")


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++2m", "euler"])
def test_degenerate_schedules_are_plain_sampling_bitwise(sd1, scheduler):
    """Every step a key step (no injection), DeepCache interval 1, T-GATE gate at the last step with the
    self-attention cached every step: each computes what plain sampling computes."""
    steps = 5
    plain, _ = _sample(*sd1, scheduler, steps, None)
    # Faster Diffusion's loop (scale_model_input at key steps, multistep carries) on every scheduler; the others'
    # loops do not depend on the scheduler beyond what `denoise` already shares.
    faster = [f"faster:every1:inject=0:decode={d}" for d in ("parallel", "sequential")]
    specs = faster + (["deepcache:1", "tgate:5:sp=1"] if scheduler == "ddim" else [])
    for spec in specs:
        got, _ = _sample(*sd1, scheduler, steps, spec)
        np.testing.assert_array_equal(got, plain, err_msg=spec)


def test_faster_diffusion_sequential_decoding_equals_the_parallel_form(sd1):
    """A non-key step's decoder sees the key step's features and its own timestep, never its latent: decoding the
    group in one batched call or step by step is the same arithmetic (float32 reassociation apart)."""
    spec = "faster:0,1,2,5,10"
    parallel, _ = _sample(*sd1, "ddim", 14, spec + ":decode=parallel")
    sequential, _ = _sample(*sd1, "ddim", 14, spec + ":decode=sequential")
    np.testing.assert_allclose(sequential, parallel, rtol=0, atol=1e-4)
    assert np.abs(parallel).max() > 0.1  # not trivially zero


def test_recorded_call_traces_match_the_schedules(sd1):
    steps = 14
    LOG.clear()
    _, plan = _sample(*sd1, "ddim", steps, "faster:0,1,2,5,10:decode=parallel", recording=True)
    ts = [float(t) for t in np.asarray(plan.timesteps)]
    # Per group: the encoder on 2B rows at the key step, one decoder call on size * 2B rows (size 1: the key's).
    expect = []
    for start, size in [(0, 1), (1, 1), (2, 3), (5, 5), (10, 4)]:
        expect += [("encode", 4, ts[start]), ("decode", 4 * size, None)]
    assert [(w, b, t if w == "encode" else None) for w, b, t in _trace()] == expect

    LOG.clear()
    _sample(*sd1, "ddim", steps, "faster:0,1,2,5,10:decode=sequential", recording=True)
    # Step by step: the encoder at the key steps only, the decoder at every step with the step's own timestep.
    expect = []
    for i, t in enumerate(ts):
        expect += ([("encode", 4, t)] if i in (0, 1, 2, 5, 10) else []) + [("decode", 4, t)]
    assert _trace() == expect

    LOG.clear()
    _sample(*sd1, "ddim", 7, "deepcache:3:branch=2", recording=True)
    assert [w for w, _, _ in _trace()] == ["full", "shallow", "shallow", "full", "shallow", "shallow", "full"]

    LOG.clear()
    _sample(*sd1, "ddim", steps, "tgate:10", recording=True)
    letters = ["".join(p[:2]) for p in TGATE_10_OF_14]
    batches = [4 if len(p) == 2 else 2 for p in TGATE_10_OF_14]
    assert [(w, b) for w, b, _ in _trace()] == list(zip(letters, batches))
