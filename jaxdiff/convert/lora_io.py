"""LoRA files as other tools write them, both ways and exact: kohya-ss (`lora_unet_*` / `lora_te_*` / `lora_te1_*` /
`lora_te2_*` with lora_down, lora_up and a per-module alpha) and PEFT/diffusers (`unet.<module>.lora_A.weight` /
`lora_B.weight`, alphas in the file's metadata); α/r is kept per module and applied once (`fold_alpha`)."""

from __future__ import annotations

import json

import numpy as np

from jaxdiff.convert import layout
from jaxdiff.errors import UserError

# kohya-ss prefixes per component; SDXL's first text encoder is "te1" (SD 1.x/2.x: "te").
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
SDXL_TE1 = "lora_te1_"
PEFT_ALPHAS = "lora_alphas"  # safetensors metadata key: JSON {"<component>.<module>": alpha}


def module_names(model) -> dict[str, str]:
    """{jaxdiff module path "a/b_0/c": PyTorch module name "a.b.0.c"} for every kernel of `model`."""
    names = {}
    for entry in layout.conversion_table(model):
        if entry.flax_path[-1] == "kernel":
            names["/".join(entry.flax_path[:-1])] = entry.torch_key.removesuffix(".weight")
    return names


def _torch_pair(adapter: dict) -> tuple[np.ndarray, np.ndarray]:
    """(down [r, in] or [r, in, kh, kw], up [out, r] or [out, r, 1, 1]) in PyTorch's layout."""
    down, up = np.asarray(adapter["down"], np.float32), np.asarray(adapter["up"], np.float32)
    if down.ndim == 2:
        return np.ascontiguousarray(down.T), np.ascontiguousarray(up.T)
    return np.ascontiguousarray(down.transpose(3, 2, 0, 1)), np.ascontiguousarray(up.T[:, :, None, None])


def _jax_pair(down: np.ndarray, up: np.ndarray) -> dict:
    if down.ndim == 2:
        return {"down": np.ascontiguousarray(down.T), "up": np.ascontiguousarray(up.T)}
    return {"down": np.ascontiguousarray(down.transpose(2, 3, 1, 0)), "up": np.ascontiguousarray(up[:, :, 0, 0].T)}


def _alpha(alphas: dict | float | None, path: str, rank: int) -> float:
    if alphas is None:
        return float(rank)
    return float(alphas[path]) if isinstance(alphas, dict) else float(alphas)


def _kohya_prefix(component: str, sdxl: bool) -> str:
    return SDXL_TE1 if (sdxl and component == "text_encoder") else KOHYA_PREFIX[component]


def to_kohya(components: dict, alphas: dict | None = None, sdxl: bool = False) -> dict[str, np.ndarray]:
    """components {name: (model, adapters)} -> a kohya-ss state dict. `alphas` {name: {path: alpha} or one alpha}
    (default: alpha = rank, i.e. α/r = 1)."""
    state = {}
    for component, (model, adapters) in components.items():
        names = module_names(model)
        for path, adapter in adapters.items():
            if path not in names:
                raise UserError(f"{component} has no kernel {path!r} for a LoRA adapter")
            key = _kohya_prefix(component, sdxl) + names[path].replace(".", "_")
            down, up = _torch_pair(adapter)
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
            alpha = _alpha((alphas or {}).get(component), path, down.shape[0])
            state[f"{key}.alpha"] = np.asarray(alpha, np.float32)
    return state


def from_kohya(state: dict, models: dict, sdxl: bool | None = None) -> tuple[dict, dict]:
    """A kohya-ss state dict -> ({component: adapters}, {component: {path: alpha}}) for `models` {name: Model}.
    Every key must be consumed: unknown modules and stray keys are one UserError naming them."""
    sdxl = any(k.startswith(SDXL_TE1) for k in state) if sdxl is None else sdxl
    lookup = {}
    for component, model in models.items():
        prefix = _kohya_prefix(component, sdxl)
        lookup.update({prefix + t.replace(".", "_"): (component, p) for p, t in module_names(model).items()})
    adapters: dict = {c: {} for c in models}
    alphas: dict = {c: {} for c in models}
    used, unknown = set(), []
    for key in sorted(state):
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        if name not in lookup:
            unknown.append(name)
            continue
        component, path = lookup[name]
        up_key, alpha_key = f"{name}.lora_up.weight", f"{name}.alpha"
        if up_key not in state:
            unknown.append(up_key + " (missing)")
            continue
        down, up = np.asarray(state[key], np.float32), np.asarray(state[up_key], np.float32)
        adapters[component][path] = _jax_pair(down, up)
        alphas[component][path] = float(np.asarray(state[alpha_key])) if alpha_key in state else float(down.shape[0])
        used.update({key, up_key, alpha_key})
    _check_fit("kohya", unknown, sorted(set(state) - used))
    return adapters, alphas


def to_peft(components: dict, alphas: dict | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """components {name: (model, adapters)} -> (PEFT/diffusers state dict, safetensors metadata with the alphas)."""
    state, alpha_meta = {}, {}
    for component, (model, adapters) in components.items():
        names = module_names(model)
        for path, adapter in adapters.items():
            if path not in names:
                raise UserError(f"{component} has no kernel {path!r} for a LoRA adapter")
            key = f"{component}.{names[path]}"
            down, up = _torch_pair(adapter)
            state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = down, up
            alpha_meta[key] = _alpha((alphas or {}).get(component), path, down.shape[0])
    return state, {PEFT_ALPHAS: json.dumps(alpha_meta, sort_keys=True)}


def from_peft(state: dict, models: dict, metadata: dict | None = None) -> tuple[dict, dict]:
    """A PEFT/diffusers LoRA state dict (and its metadata's alphas; none: alpha = rank) -> ({component: adapters},
    {component: {path: alpha}}). Unknown modules and stray keys are one UserError naming them."""
    meta_alphas = json.loads((metadata or {}).get(PEFT_ALPHAS, "{}"))
    lookup = {}
    for component, model in models.items():
        lookup.update({f"{component}.{t}": (component, p) for p, t in module_names(model).items()})
    adapters: dict = {c: {} for c in models}
    alphas: dict = {c: {} for c in models}
    used, unknown = set(), []
    for key in sorted(state):
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight")
        b_key = f"{name}.lora_B.weight"
        if name not in lookup or b_key not in state:
            unknown.append(name if name not in lookup else b_key + " (missing)")
            continue
        component, path = lookup[name]
        down, up = np.asarray(state[key], np.float32), np.asarray(state[b_key], np.float32)
        adapters[component][path] = _jax_pair(down, up)
        alphas[component][path] = float(meta_alphas.get(name, down.shape[0]))
        used.update({key, b_key})
    _check_fit("PEFT", unknown, sorted(set(state) - used))
    return adapters, alphas


def _check_fit(kind: str, unknown: list[str], stray: list[str]) -> None:
    """One UserError naming the modules a file adapts that the models lack and the keys that are no LoRA pair."""
    if unknown or stray:
        parts = [f"modules these models do not have: {', '.join(unknown)}"] if unknown else []
        parts += [f"keys that are no LoRA pair: {', '.join(stray)}"] if stray else []
        raise UserError(f"{kind} LoRA file does not fit: " + "; ".join(parts))


def fold_alpha(adapters: dict, alphas: dict) -> dict:
    """Adapters with each module's α/r folded into its `up`, so that `lora.merge(params, adapters)` (α/r = 1)
    applies every module's own α/r exactly once."""
    out = {}
    for path, a in adapters.items():
        rank = np.shape(a["down"])[-1]
        out[path] = {"down": a["down"], "up": np.asarray(a["up"], np.float32) * np.float32(alphas[path] / rank)}
    return out
