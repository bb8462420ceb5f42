"""The `jaxdiff` command line: convert, export, info (more subcommands register the same way)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

# transformers (used here for tokenizers and configs only) warns at import that PyTorch is missing, which alarms a
# user who installed jaxdiff without the optional torch extra and did nothing wrong.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import jaxdiff  # noqa: E402
from jaxdiff.errors import EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_USER_ERROR, Preempted, UserError

# Errors a user can cause and fix: reported in one `jaxdiff: error:` line, exit status 2, no traceback (ConfigError,
# CorruptCheckpointError, UnsafeCheckpointError, CheckpointMismatchError... are UserErrors). Anything else is a bug
# and keeps its traceback.
_USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# Raised by modules that import jax: named here, looked up only once imported (`jaxdiff --help` stays jax-free).
_NONFINITE = (("jaxdiff.train.step", "NonFiniteError"), ("jaxdiff.train.checkpoint", "NonFiniteCheckpointError"))


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="PyTorch/diffusers -> jaxdiff checkpoint",
        description="Convert a diffusers pipeline or component folder (or one .safetensors/.bin file with --config) "
        "into a jaxdiff checkpoint (float32 params.safetensors per component; loads without torch). An original "
        "single-file checkpoint (SD 1.x / 2.x / SDXL base, .safetensors or .ckpt, as A1111 and ComfyUI use) becomes a "
        "jaxdiff pipeline: architecture and configs from its tensors, or configs, scheduler and tokenizer(s) from "
        "--config-from.",
    )
    p.add_argument("src", help="diffusers pipeline folder, component folder, or a single weights file")
    p.add_argument("dst", help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--config", help="config.json for the weights file of one diffusers/transformers component")
    p.add_argument(
        "--config-from",
        help="single file: a diffusers pipeline folder or jaxdiff checkpoint of the same architecture to take the "
        "configs, scheduler and tokenizer(s) from (a single file holds no tokenizer)",
    )
    p.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction"),
        help="single file: what the UNet predicts, which the tensors cannot show (default: --config-from's "
        "scheduler, else epsilon; SD 2.x 768-v models are v_prediction)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_convert)


def _convert(args) -> int:
    from jaxdiff.convert import checkpoint, single_file

    if os.path.isfile(args.src) and args.config is None:
        summary = single_file.convert(
            args.src,
            args.dst,
            config_from=_builtin(args.config_from) if args.config_from else None,
            prediction_type=args.prediction_type,
            overwrite=args.overwrite,
            progress=None,
        )
    elif args.config_from or args.prediction_type:
        raise UserError("--config-from and --prediction-type apply to single-file checkpoints only")
    else:
        summary = checkpoint.convert(args.src, args.dst, config=args.config, overwrite=args.overwrite, progress=None)
    _print_summary("converted", summary)
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="jaxdiff checkpoint -> diffusers folder",
        description="Export a jaxdiff checkpoint as a diffusers/transformers folder with safetensors weights, "
        "loadable with from_pretrained.",
    )
    p.add_argument("src", help="jaxdiff checkpoint folder, or 'shapes' for the embedded model")
    p.add_argument("dst", help="output folder (must not exist or be empty, unless --overwrite), or FILE.safetensors")
    p.add_argument(
        "--single-file",
        action="store_true",
        help="write one original-layout .safetensors (SD 1.x / 2.x / SDXL: model.diffusion_model.*, "
        "first_stage_model.*, ...); implied by a DST ending in .safetensors; a checkpoint converted from a single "
        "file exports bitwise equal to it",
    )
    p.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), help="single file: store every tensor in this dtype"
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from jaxdiff.convert import checkpoint, single_file

    if args.single_file or str(args.dst).endswith(".safetensors"):
        summary = single_file.export(
            _builtin(args.src), args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=None
        )
    elif args.dtype:
        raise UserError("--dtype applies to single-file exports (--single-file) only")
    else:
        summary = checkpoint.export(_builtin(args.src), args.dst, overwrite=args.overwrite, progress=None)
    _print_summary("exported", summary)
    return 0


def _builtin(path: str) -> str:
    """A built-in model name ("shapes") -> its folder; anything else unchanged."""
    from jaxdiff.sampling.pipeline import BUILTIN

    return str(BUILTIN[path]) if path in BUILTIN and not os.path.exists(path) else path


def _print_summary(verb: str, summary: dict) -> None:
    print(f"{verb} {summary['src']} -> {summary['dst']}")
    if summary.get("architecture"):
        print(f"  architecture: {summary['architecture']} (decided by {', '.join(summary.get('decided_by', []))})")
    for name, c in summary["components"].items():
        print(f"  {name:<16} {c['class']:<30} {c['params']:>14,} params  {c['tensors']:>5} tensors")
    if summary.get("copied"):
        print(f"  copied: {', '.join(summary['copied'])}")
    if summary.get("skipped"):
        print(f"  skipped (no jaxdiff model class): {', '.join(summary['skipped'])}")
    for note in summary.get("notes", []):
        print(f"  note: {note}")


def _add_info(sub) -> None:
    p = sub.add_parser(
        "info",
        help="components, classes, parameter counts, stored dtypes",
        description="Describe a jaxdiff checkpoint, a diffusers pipeline/component folder or a weights file.",
    )
    p.add_argument("path", nargs="?", default="shapes", help="folder or weights file (default: the embedded shapes)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=_info)


def _info(args) -> int:
    from jaxdiff.convert import single_file

    result = single_file.info(_builtin(args.path))  # checkpoint.info, plus the architecture of a single file
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['path']} ({result['format']})")
    if "architecture" in result:
        decided = f" (decided by {', '.join(result['decided_by'])})" if result.get("decided_by") else ""
        print(f"  architecture: {result['architecture'] or result.get('architecture_error')}{decided}")
    if result.get("prediction_type"):
        print(f"  prediction type: {result['prediction_type']}")
    total = 0
    for name, c in result["components"].items():
        dtypes = ", ".join(f"{tag}:{n}" for tag, n in sorted(c["dtypes"].items()))
        cls = c.get("class") or "?"
        note = "" if c.get("supported", True) else "  (not supported by jaxdiff)"
        print(f"  {name:<16} {cls:<30} {c['params']:>14,} params  {c['tensors']:>5} tensors  [{dtypes}]{note}")
        total += c["params"]
    if len(result["components"]) > 1:
        print(f"  {'total':<16} {'':<30} {total:>14,} params")
    if result["other"]:
        print(f"  other: {', '.join(result['other'])}")
    return 0


# Each entry adds one subcommand; later ones (generate, train, erase, distill, evaluate) append here.
SUBCOMMANDS: list[Callable] = [_add_convert, _add_export, _add_info]


def _config_overrides(p) -> None:
    """Let parser `p` collect --config.KEY=VALUE arguments into `args.overrides` (argparse cannot declare them)."""
    p.set_defaults(overrides=[])
    parse_known = p.parse_known_args

    def parse_with_overrides(args=None, namespace=None):
        namespace, rest = parse_known(args, namespace)
        namespace.overrides = list(namespace.overrides) + [a for a in rest if a.startswith("--config.")]
        return namespace, [a for a in rest if not a.startswith("--config.")]

    p.parse_known_args = parse_with_overrides


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train with a configs/train/*.py config (resumes from the workdir's last checkpoint)",
        description="Train with an ml_collections config file: --config FILE[:ARG], then any --config.KEY=VALUE "
        "overrides (e.g. --config.total_steps=100 --config.mesh.fsdp=8). Resumes from WORKDIR/checkpoints when "
        "present. Multi-process: --coordinator HOST:PORT --num-processes N --process-id I (or the JAXDIFF_* "
        "environment variables set by launch/local.sh), or --distributed on TPU pods and SLURM (auto-detected).",
    )
    p.add_argument("--config", required=True, help="config file, optionally with an argument: FILE.py[:ARG]")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard events")
    p.add_argument("--coordinator", default=os.environ.get("JAXDIFF_COORDINATOR"), help="HOST:PORT of process 0")
    p.add_argument("--num-processes", type=int, default=_env_int("JAXDIFF_NUM_PROCESSES"))
    p.add_argument("--process-id", type=int, default=_env_int("JAXDIFF_PROCESS_ID"))
    p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() with auto-detection")
    p.set_defaults(func=_train)
    _config_overrides(p)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _train(args) -> int:
    from jaxdiff.config import load_config
    from jaxdiff.train import config as config_lib
    from jaxdiff.train import distributed, loop
    from jaxdiff.train.step import NonFiniteError

    config = config_lib.apply_overrides(load_config(args.config), args.overrides)
    distributed.initialize_distributed(args.coordinator, args.num_processes, args.process_id, args.distributed)
    try:
        result = loop.train(config, args.workdir)
    except NonFiniteError as e:
        print(f"jaxdiff: stopped: {e}", file=sys.stderr)
        return 3
    loss = "n/a" if result["loss"] is None else f"{result['loss']:.5g}"
    print(f"step {result['step']} (done): loss {loss}, skipped {result['skipped']}, workdir {args.workdir}")
    return 0


SUBCOMMANDS.append(_add_train)


def _add_erase(sub) -> None:
    p = sub.add_parser(
        "erase",
        help="erase a concept with a configs/erase/*.py method; writes the edited model, a grid and a report",
        description="Erase a concept: --config configs/erase/METHOD.py[:VARIANT] then --config.KEY=VALUE overrides "
        "(--config.concept=circle --config.preserve='square;triangle' --config.anchor=...). Writes OUT/model (a "
        "jaxdiff checkpoint; `jaxdiff export OUT/model DST` for diffusers), OUT/before_after.png, OUT/report.json "
        "and OUT/report.md. Fine-tuning methods resume from OUT/train when rerun with the same config.",
    )
    p.add_argument(
        "--config",
        required=True,
        help="configs/erase/<method>.py, optionally :VARIANT (e.g. :runlocal); without one, the built-in shapes "
        "model runs the :shapes preset",
    )
    p.add_argument("--model", default=None, help="'shapes' (default) or a diffusers / jaxdiff pipeline folder")
    p.add_argument("--out", required=True, help="output folder (resumed if it holds a run of the same config)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it holds something else")
    p.add_argument("--attacks", action="store_true", help="also measure the two attacks (sets config.eval.attacks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_erase)
    _config_overrides(p)


def _erase(args) -> int:
    from jaxdiff.config import apply_overrides, load_config
    from jaxdiff.erase.run import erase, summary
    from jaxdiff.generate import enable_compilation_cache

    enable_compilation_cache()

    config = apply_overrides(load_config(args.config), args.overrides)
    if args.model:
        config.model = args.model
    preset = model_preset(args.config, config.model)
    if preset:  # a method named without a variant, run on the built-in model: that model's calibrated preset
        print(f"using the built-in model's preset {preset} (name a variant, e.g. {args.config}:paper, to choose)")
        config = apply_overrides(load_config(preset), args.overrides)
        if args.model:
            config.model = args.model
    if args.attacks:
        config.eval.attacks = True
    report = erase(config, args.out, progress=not args.no_progress, overwrite=args.overwrite)
    print(summary(report))
    print(f"wrote {args.out}/model, before_after.png, report.md, report.json")
    return 0


def model_preset(config_spec: str, model: str) -> str | None:
    """`configs/erase/M.py:shapes` when `config_spec` names no variant and the model is the built-in `shapes`: the
    methods' plain defaults are the official SD settings, which on the tiny model erase nothing or break it."""
    if ":" in config_spec or model != "shapes":
        return None
    return f"{config_spec}:shapes"


SUBCOMMANDS.append(_add_erase)


def _add_distill(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="distill a teacher to a few-step student with a configs/distill/*.py method "
        "(reflow, instaflow, sid, lcm, dmd2, scm)",
        description="Distill: --config configs/distill/METHOD.py[:shapes|:runlocal] then --config.KEY=VALUE "
        "overrides. Makes teacher (noise, latent) pairs (OUT/pairs, resumable; sid and dmd2 are data-free), "
        "trains the student on the runner "
        "(OUT/train, resumes when rerun with the same config), writes OUT/model (loadable by load_pipeline and "
        "`jaxdiff generate --model OUT/model`), OUT/before_after.png, OUT/report.json and OUT/report.md.",
    )
    p.add_argument("--config", required=True, help="configs/distill/<method>.py, optionally :VARIANT")
    p.add_argument("--out", required=True, help="output folder (resumed if it holds a run of the same config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_distill)
    _config_overrides(p)


def _distill(args) -> int:
    from jaxdiff.config import apply_overrides, load_config
    from jaxdiff.distill.evaluate import table
    from jaxdiff.distill.run import distill
    from jaxdiff.generate import enable_compilation_cache

    enable_compilation_cache()
    config = apply_overrides(load_config(args.config), args.overrides)
    report = distill(config, args.out, progress=not args.no_progress)
    print("\n".join(table(report)))
    print(f"wrote {args.out}/model, before_after.png, report.md, report.json")
    return 0


SUBCOMMANDS.append(_add_distill)


def _add_generate(sub) -> None:
    from jaxdiff import generate

    generate.add_parser(sub)


SUBCOMMANDS.append(_add_generate)


def _add_evaluate(sub) -> None:
    from jaxdiff.metrics import evaluate

    evaluate.add_parser(sub)


SUBCOMMANDS.append(_add_evaluate)


def _add_personalize(sub) -> None:
    from jaxdiff.personalize import command

    command.add_parser(sub)


SUBCOMMANDS.append(_add_personalize)


def _add_controlnet_train(sub) -> None:
    from jaxdiff.control import command

    command.add_parser(sub)


SUBCOMMANDS.append(_add_controlnet_train)


def _add_protect(sub) -> None:
    from jaxdiff.protect import command

    command.add_parser(sub)


SUBCOMMANDS.append(_add_protect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdiff", description=jaxdiff.__doc__)
    parser.add_argument("--version", action="version", version=f"jaxdiff {jaxdiff.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _loaded(*names: tuple[str, str]) -> tuple[type, ...]:
    """The exception classes (module, class name) whose modules are imported: no other can have been raised."""
    return tuple(getattr(sys.modules[m], c) for m, c in names if m in sys.modules)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors: return argparse's status instead of exiting
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    try:
        return int(args.func(args) or 0)
    except _USER_ERRORS as e:
        print(f"jaxdiff: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FloatingPointError as e:
        if not isinstance(e, _loaded(*_NONFINITE)):
            raise
        print(f"jaxdiff: stopped: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except ImportError as e:
        if getattr(e, "name", None) != "torch":
            raise  # a broken install should show its traceback
        print(f"jaxdiff: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Preempted as e:
        print(f"jaxdiff: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("jaxdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
