"""Parameter selectors: which leaves of a param tree train, by name, regex, callable or mask, and the split/combine."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
from flax import traverse_util

Path = tuple[str, ...]

# A selector: None or "" (every leaf), a name of SELECTORS, any other string as a regex searched in "a/b/c" leaf
# paths, a callable (path_string, leaf) -> bool, or a pytree of bools shaped like the params (or a prefix of them).
Selector = Any


def _attn2_kv(path: Path) -> bool:
    return "attn2" in path and path[-2] in ("to_k", "to_v")


_TRANSFORMER = re.compile(r"attentions_\d+$")
# Outside the UNet blocks: CompVis `time_embed` is `time_embedding` here and its `out.` (final GroupNorm + conv) is
# conv_norm_out / conv_out.
_TIME_AND_OUT = ("time_embedding", "conv_norm_out", "conv_out")

# name -> rule(path, is_linear) deciding whether a leaf trains; is_linear: the leaf belongs to a module with a
# kernel (Dense/Conv, so norms are excluded). Flax paths, e.g.
# ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "to_k", "kernel").
SELECTORS: dict[str, Callable[[Path, bool], bool]] = {
    # ESD, new diffusers code (`get_esd_trainable_parameters`): Linear/Conv2d modules only (norms never train).
    "esd-x": lambda p, lin: lin and "attn2" in p,
    "esd-u": lambda p, lin: lin and "attn2" not in p,
    "esd-all": lambda p, lin: lin,
    "esd-x-strict": lambda p, lin: _attn2_kv(p),
    # ESD, original CompVis code (`train_method`): every parameter by name, norms included.
    "xattn": lambda p, lin: "attn2" in p,
    "noxattn": lambda p, lin: not ("attn2" in p or p[0] in _TIME_AND_OUT),
    "selfattn": lambda p, lin: "attn1" in p,
    "full": lambda p, lin: True,
    "notime": lambda p, lin: p[0] not in _TIME_AND_OUT,
    # Concept Ablation / DoCo `parameter_group=cross-attn`: attn2.to_k and attn2.to_v.
    "cross-attn-kv": lambda p, lin: _attn2_kv(p),
    # TRCE stage 2: all of attn1 plus attn2.to_q.
    "trce": lambda p, lin: "attn1" in p or ("attn2" in p and p[-2] == "to_q"),
    # SPM's adapter sites: every Linear/Conv inside a Transformer2DModel (`attentions_<i>` of a UNet block).
    "transformers": lambda p, lin: lin and any(_TRANSFORMER.match(x) for x in p),
}


def _key(key) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path) -> str:
    """ "down_blocks_0/resnets_0/conv1/kernel" for a jax key path or a tuple of names."""
    return "/".join(_key(k) for k in path)


def flatten(tree) -> dict[Path, Any]:
    """{("a", "b", "c"): leaf} of a tree of nested dicts."""
    return traverse_util.flatten_dict(tree)


def unflatten(flat: dict[Path, Any]):
    return traverse_util.unflatten_dict(flat)


def _describe() -> str:
    return f"named selectors: {', '.join(SELECTORS)}; any other string is a regex searched in 'a/b/c' leaf paths"


def mask(params, selector: Selector):
    """A pytree of Python bools shaped like `params` (True = selected), e.g. for `optax.masked`; ValueError when
    the selector selects nothing. A name of SELECTORS takes priority over reading the string as a regex."""
    if selector is None or (isinstance(selector, str) and selector == ""):
        return jax.tree_util.tree_map(lambda _: True, params)
    if isinstance(selector, str):
        if selector in SELECTORS:
            rule = SELECTORS[selector]
            leaves = jax.tree_util.tree_leaves_with_path(params)
            with_kernel = {tuple(map(_key, p[:-1])) for p, _ in leaves if _key(p[-1]) == "kernel"}

            def fn(path, _):
                names = tuple(map(_key, path))
                return rule(names, names[:-1] in with_kernel)

        else:
            try:
                pattern = re.compile(selector)
            except re.error as err:
                raise ValueError(f"selector {selector!r} is not a valid regex ({err}); {_describe()}") from None
            fn = lambda path, _: pattern.search(path_str(path))
        result = jax.tree_util.tree_map_with_path(lambda p, leaf: bool(fn(p, leaf)), params)
    elif callable(selector):
        result = jax.tree_util.tree_map_with_path(lambda p, leaf: bool(selector(path_str(p), leaf)), params)
    else:
        # A prefix mask ({"unet": True, "vae": False}) is broadcast over the subtrees it names.
        result = jax.tree_util.tree_map(lambda m, sub: jax.tree_util.tree_map(lambda _: bool(m), sub), selector, params)
    if not any(jax.tree_util.tree_leaves(result)):
        leaves = jax.tree_util.tree_leaves_with_path(params)
        example = f" (leaf paths look like {path_str(leaves[0][0])!r})" if leaves else ""
        raise ValueError(f"the selector {selector!r} selects no parameter{example}; {_describe()}")
    return result


def selected_paths(params, selector: Selector) -> list[Path]:
    """Paths of the selected leaves of a tree of nested dicts."""
    chosen = flatten(mask(params, selector))
    return [p for p in flatten(params) if chosen[p]]


def split(params, selector: Selector):
    """(selected, rest): two trees of nested dicts holding the selected / the other leaves, paths unchanged."""
    chosen = flatten(mask(params, selector))
    flat = flatten(params)
    return (
        unflatten({p: v for p, v in flat.items() if chosen[p]}),
        unflatten({p: v for p, v in flat.items() if not chosen[p]}),
    )


def combine(selected, base):
    """The full tree: `base` with the leaves present in `selected` replaced (inverse of `split`)."""
    flat = flatten(base)
    for p, v in flatten(selected).items():
        if p not in flat:
            raise KeyError(f"leaf {path_str(p)} is not in the base params")
        flat[p] = v
    return unflatten(flat)
