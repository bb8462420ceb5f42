"""The stages in order: each runs unless done (done.json), --redo starts one again, snapshot writes a pipeline."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

from jaxdiff.train.shapes import clip, decoder, package, probe, unet, vae
from jaxdiff.train.shapes.common import STAGES, Options, Run, atomic_write_text

RUNNERS = {
    "clip": clip.stage,
    "vae": vae.stage,
    "probe": probe.stage,
    "unet": unet.stage,
    "decoder": decoder.stage,
    "package": package.stage,
}
assert tuple(RUNNERS) == STAGES


def forget(run: Run, stage: str) -> None:
    """A stage's checkpoints, plan and done marker removed, so that it starts again from step 0."""
    shutil.rmtree(run.train_dir(stage), ignore_errors=True)
    for name in ("done.json", "plan.json"):
        with contextlib.suppress(FileNotFoundError):
            (run.dir(stage) / name).unlink()


def main(opts: Options, argv: list[str] | None = None) -> int:
    run = Run(opts)
    run.log({"event": "start", "argv": argv})
    if opts.stage == "snapshot":
        out = Path(opts.snapshot_out or Path(opts.workdir) / "snapshot")
        print(json.dumps(package.write_pipeline(run, out)), flush=True)
        return 0
    stages = STAGES if opts.stage == "all" else (opts.stage,)
    t_all = time.time()
    for stage in stages:
        redo = opts.redo and opts.stage == stage
        if run.done(stage) and not redo:
            print(f"[{stage}] already done, skipping", flush=True)
            continue
        if redo:
            forget(run, stage)
        t0 = time.time()
        info = RUNNERS[stage](run)
        info["wall_seconds_this_run"] = round(time.time() - t0, 1)
        run.mark_done(stage, info)
    run.log({"event": "finished", "wall_seconds": round(time.time() - t_all, 1)})
    summary = {s: run.done(s) for s in STAGES}
    atomic_write_text(Path(opts.workdir) / "summary.json", json.dumps(summary, indent=2) + "\n")
    return 0
