"""The erasure methods: every module of `jaxdiff.erase` that declares `METHOD = MethodInfo(...)` and `run(job)`."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from types import ModuleType

from jaxdiff.errors import UserError

PACKAGE = "jaxdiff.erase"
KINDS = ("closed_form", "finetune", "closed_form+finetune", "adapter")
ANCHORS = (None, "other_concept", "kind")


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    """What the command, the scorecard and the tests know of a method besides its `run(job) -> Result`.

    A method module declares the first fields; the registry fills `name` (the module's name) and `module`.
    """

    kind: str  # one of KINDS
    order: int  # position in listings (the scorecard's rows); ties go by name
    selector: str | None = None  # the default trainable selector (config.train.selector) of a fine-tuning method
    needs_anchor: bool = False  # `jaxdiff erase` refuses an empty --config.anchor: the method trains on its images
    # The method fine-tunes UNet leaves through `finetune.train_selected`, which adds `config.train.retain_weight`'s
    # term; `jaxdiff erase` refuses a nonzero retain_weight for the others before loading anything.
    retention: bool = False
    # The anchor the scorecard passes: "other_concept" (the first other concept of the target's kind), "kind" (the
    # generic word: shape / colour) or None (no --config.anchor).
    anchor: str | None = None
    name: str = ""
    module: ModuleType | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"MethodInfo.kind={self.kind!r}; choose from {KINDS}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"MethodInfo.anchor={self.anchor!r}; choose from {ANCHORS}")
        if self.needs_anchor and self.anchor is None:
            raise ValueError("a method that needs an anchor names the scorecard's (MethodInfo.anchor)")


def _module_names() -> list[str]:
    package = importlib.import_module(PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.ispkg)


@functools.cache
def _discover() -> tuple[MethodInfo, ...]:
    found = []
    for name in _module_names():
        module = importlib.import_module(f"{PACKAGE}.{name}")
        info = getattr(module, "METHOD", None)
        if isinstance(info, MethodInfo) and callable(getattr(module, "run", None)):
            found.append(dataclasses.replace(info, name=name, module=module))
    return tuple(sorted(found, key=lambda m: (m.order, m.name)))


def methods() -> dict[str, MethodInfo]:
    """{name: MethodInfo} of every method, in display order (imports the package's modules on the first call)."""
    return {m.name: m for m in _discover()}


def get(name: str) -> MethodInfo:
    """The method `name`; a UserError listing the known ones when there is none."""
    known = methods()
    if name not in known:
        raise UserError(f"unknown erasure method {name!r}; choose from {', '.join(known)}")
    return known[name]


def clear_cache() -> None:
    """Forget the discovered methods: the next call looks again (for a module added while running)."""
    _discover.cache_clear()
