"""The `jaxdiff` command line: convert, export, info (more subcommands register the same way)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

import jaxdiff

# Errors a user can cause and fix: reported in one `jaxdiff: error:` line, exit status 2, no traceback.
# CorruptCheckpointError, UnsafeCheckpointError and CheckpointMismatchError are ValueErrors; OSError covers
# FileNotFoundError, FileExistsError and permission problems.
_USER_ERRORS = (ValueError, OSError)


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="PyTorch/diffusers -> jaxdiff checkpoint",
        description="Convert a diffusers pipeline or component folder (or one .safetensors/.bin file with --config) "
        "into a jaxdiff checkpoint (float32 params.safetensors per component; loads without torch).",
    )
    p.add_argument("src", help="diffusers pipeline folder, component folder, or a single weights file")
    p.add_argument("dst", help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--config", help="config.json for a single weights file")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_convert)


def _convert(args) -> int:
    from jaxdiff.convert import checkpoint

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
    p.add_argument("src", help="jaxdiff checkpoint folder")
    p.add_argument("dst", help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from jaxdiff.convert import checkpoint

    summary = checkpoint.export(args.src, args.dst, overwrite=args.overwrite, progress=None)
    _print_summary("exported", summary)
    return 0


def _print_summary(verb: str, summary: dict) -> None:
    print(f"{verb} {summary['src']} -> {summary['dst']}")
    for name, c in summary["components"].items():
        print(f"  {name:<16} {c['class']:<30} {c['params']:>14,} params  {c['tensors']:>5} tensors")
    if summary.get("copied"):
        print(f"  copied: {', '.join(summary['copied'])}")
    if summary.get("skipped"):
        print(f"  skipped (no jaxdiff model class): {', '.join(summary['skipped'])}")


def _add_info(sub) -> None:
    p = sub.add_parser(
        "info",
        help="components, classes, parameter counts, stored dtypes",
        description="Describe a jaxdiff checkpoint, a diffusers pipeline/component folder or a weights file.",
    )
    p.add_argument("path", help="folder or weights file")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=_info)


def _info(args) -> int:
    from jaxdiff.convert import checkpoint

    result = checkpoint.info(args.path)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['path']} ({result['format']})")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdiff", description=jaxdiff.__doc__)
    parser.add_argument("--version", action="version", version=f"jaxdiff {jaxdiff.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors: return argparse's status instead of exiting
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    try:
        return int(args.func(args) or 0)
    except _USER_ERRORS as e:
        print(f"jaxdiff: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        if getattr(e, "name", None) != "torch":
            raise  # a broken install should show its traceback
        print(f"jaxdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
