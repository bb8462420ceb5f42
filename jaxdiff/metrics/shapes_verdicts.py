"""Both shapes judges' verdicts on generated images against the prompts that asked for them (for generate.json)."""

from __future__ import annotations

import numpy as np

from jaxdiff.data import shapes as S


def applies(images: np.ndarray, prompts: list[str]) -> bool:
    """Whether the images are shapes-world images (32×32) whose every prompt names a shape or a colour."""
    if images.ndim != 4 or images.shape[1:3] != (32, 32):
        return False
    return all(any(o["shape"] or o["colour"] for o in S.parse_prompt(p)["objects"]) for p in prompts)


def _objects(judged: dict, i: int) -> list[dict]:
    out = []
    for slot in range(judged["shape"].shape[1]):
        shape, colour = int(judged["shape"][i, slot]), int(judged["colour"][i, slot])
        if shape < 0 and colour < 0:
            continue
        out.append(
            {
                "shape": S.ALL_SHAPES[shape] if shape >= 0 else None,
                "colour": S.ALL_COLOURS[colour] if colour >= 0 else None,
            }
        )
    return out


def _matches(asked: list[dict], seen: list[dict]) -> bool:
    """Every attribute the prompt states is what the judge sees, slot by slot (left first), and no object is missing."""
    if len(seen) != len(asked):
        return False
    return all(a[k] is None or a[k] == s[k] for a, s in zip(asked, seen) for k in ("shape", "colour"))


def verdicts(images, prompts: list[str]) -> tuple[list[dict], dict]:
    """Per image {"asked", "pixel_judge", "probe"} (each judge: valid, objects seen, whether they match the prompt)
    and a summary of the rates. images: uint8 [N, 32, 32, 3], one prompt per image."""
    from jaxdiff.metrics import pixel_judge
    from jaxdiff.metrics.probe import load_probe

    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    asked = [[{k: o[k] for k in ("shape", "colour")} for o in S.parse_prompt(p)["objects"]] for p in prompts]
    expected = np.array([max(1, min(2, len(a))) for a in asked])
    judged = {
        "pixel_judge": pixel_judge.judge(images, expected, shapes=S.SHAPES, colours=S.COLOURS),
        "probe": load_probe().judge(images, expected),
    }
    records = []
    for i, wanted in enumerate(asked):
        record = {"asked": wanted}
        for name, j in judged.items():
            seen = _objects(j, i)
            valid = bool(j["valid"][i])
            record[name] = {"valid": valid, "reason": str(j["reason"][i]), "objects": seen}
            record[name]["matches_prompt"] = valid and _matches(wanted, seen)
        records.append(record)
    n = len(records)
    summary = {"n": n}
    for name in judged:
        summary[f"{name}_valid"] = sum(r[name]["valid"] for r in records) / n
        summary[f"{name}_matches_prompt"] = sum(r[name]["matches_prompt"] for r in records) / n
    return records, summary
