#!/usr/bin/env python
"""The TPU plans table (docs/tpu_plans.md): for each model, resolution and TPU topology, the candidate plans (mesh,
global batch, remat) compiled ahead of time on this host by tools/aot_compile.py, and the best one that fits.

Each candidate is one `python tools/aot_compile.py ... --json CELL` run in its own process (XLA:TPU compiles of
SD-sized steps take 10-25 min and several GB here), written to <workdir>/<cell>.json with the key it was computed
under: a hash of the source files the compiled program depends on (the models, trainer, sampler, sharding and the
tool). A cell of another key is stale: it is shown as such, never used for a plan, and recomputed by --run, unless
--revalidate finds its program unchanged (the hash of the lowered StableHLO, which aot_compile records). The
table is rewritten from the current cells every time, with the command of each cell still to compute, so work can
be spread over several sittings:

  python tools/tpu_plans.py --list                 # every cell and its state
  python tools/tpu_plans.py --run 2                # compute the next 2 missing or stale cells, rewrite the table
  python tools/tpu_plans.py --run all --only sd15  # every sd15 cell
  python tools/tpu_plans.py --run 1 --only lcm     # the LCM distillation step's cells
  python tools/tpu_plans.py --run 1 --only sd15,sample  # the SD1.5 sampling cell
  python tools/tpu_plans.py --revalidate           # re-key stale cells whose program is unchanged (no compile)
  python tools/tpu_plans.py                        # only rewrite docs/tpu_plans.md from the cells

Best plan: among a group's candidates that fit the chip's HBM (XLA's peak per device), the highest predicted
images/s (roofline step time; see tools/aot_compile.py for what it counts and misses).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxdiff import fileio  # noqa: E402

# What each task's compiled program depends on: a change to any of these files makes that task's cells stale.
_COMMON = ("jaxdiff/models", "jaxdiff/sharding.py", "jaxdiff/platforms.py", "tools/aot_compile.py")
SOURCES = {
    "train": (*_COMMON, "jaxdiff/train", "jaxdiff/selectors.py", "configs/train"),
    "sample": (*_COMMON, "jaxdiff/sampling"),
    "distill": (
        *_COMMON,
        "jaxdiff/train",
        "jaxdiff/selectors.py",
        "jaxdiff/lora.py",
        "jaxdiff/sampling",
        "jaxdiff/distill",
        "configs/train",
        "configs/distill",
    ),
}


def select(grid: list, only: str) -> list:
    """The cells `--only` names: values of one kind (model, topology, task, method, XLA level, weights) are
    alternatives; kinds combine."""
    values = {x for x in only.split(",") if x}
    kinds = [
        lambda c: c.model,
        lambda c: c.topology,
        lambda c: c.task,
        lambda c: c.method,
        lambda c: c.opt,
        lambda c: c.weights,
    ]
    wanted = [{v for v in values if any(k(c) == v for c in grid)} for k in kinds]
    unknown = values - set().union(*wanted)
    if unknown:
        return []
    return [c for c in grid if all(not w or k(c) in w for k, w in zip(kinds, wanted))]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One candidate plan: the tool's flags."""

    model: str
    res: int
    topology: str
    task: str
    mesh: str
    batch: int
    remat: str = "none"
    method: str = ""  # distill: the distillation method (tools/aot_compile.py --method)
    opt: str = "default"  # XLA's optimisation level (tools/aot_compile.py --opt-level): "default" or "O0"
    weights: str = "fp32"  # sample: the dtype the params are held in (tools/aot_compile.py --weights)

    @property
    def group(self) -> tuple:
        return (self.task, self.method, self.model, self.res, self.topology)

    @property
    def name(self) -> str:
        parts = (self.task + self.method, self.model, self.res, self.topology, self.mesh, f"b{self.batch}", self.remat)
        parts += () if self.weights == "fp32" else (f"w{self.weights}",)
        parts += () if self.opt == "default" else (self.opt,)
        return "-".join(str(x) for x in parts).replace(":", "_").replace(",", "_").replace("=", "")

    def flags(self) -> list[str]:
        out = ["--topology", self.topology, "--model", self.model, "--task", self.task, "--mesh", self.mesh]
        out += ["--batch", str(self.batch), "--res", str(self.res), "--dtype", "bf16"]
        out += ["--remat", self.remat] if self.task in ("train", "distill") else []
        out += ["--method", self.method] if self.method else []
        out += [] if self.weights == "fp32" else ["--weights", self.weights]
        return out + ([] if self.opt == "default" else ["--opt-level", self.opt])

    def command(self) -> str:
        return "python tools/aot_compile.py " + " ".join(self.flags())


def _train(model, res, topology, chips, batch) -> list[Cell]:
    fsdp = f"fsdp={chips}"
    return [
        Cell(model, res, topology, "train", fsdp, batch),
        Cell(model, res, topology, "train", fsdp, 2 * batch, "blocks"),
    ]


# The candidates per (task, model, res, topology): fsdp over every chip (the step's parameters, optimiser state and
# EMA are sharded; the batch too) at a global batch without remat, and at twice that batch with block remat;
# sampling data-parallel.
_PLANS: tuple[Cell, ...] = (
    *_train("sd15", 512, "v5e:4x4", 16, 64),
    *_train("sd21", 512, "v5e:4x4", 16, 64),
    *_train("sdxl", 512, "v5e:4x4", 16, 16),
    *_train("sd15", 512, "v5p:4x4x4", 64, 256),
    *_train("sd21", 512, "v5p:4x4x4", 64, 256),
    *_train("sdxl", 512, "v5p:4x4x4", 64, 128),
    *_train("sdxl", 1024, "v5p:4x4x4", 64, 64),
    *_train("sd15", 512, "v6e:16x16", 256, 1024),
    *_train("sdxl", 1024, "v6e:16x16", 256, 256),
    Cell("sd15", 512, "v5e:4x4", "sample", "data=16", 16),
    Cell("sdxl", 1024, "v5e:4x4", "sample", "data=16", 16),
    # SDXL's float32 weights, replicated, take 9.8 of a v5e chip's 16 GiB (data=16 does not fit at 1024²): the same
    # batch with the weights sharded over the 16 chips (gathered layer by layer; at O0 its temporaries took 37.6 GiB),
    # and with the weights held in bf16 as an inference deployment loads them (jaxdiff generate --weights-dtype).
    Cell("sdxl", 1024, "v5e:4x4", "sample", "fsdp=16", 16),
    Cell("sdxl", 1024, "v5e:4x4", "sample", "data=16", 16, weights="bf16"),
    Cell("sdxl", 1024, "v5p:4x4x4", "sample", "data=64", 64),
    # Every distillation method's real step (student, fake score / target networks and the frozen teacher) at the
    # SD1.5 configuration on 4 chips: that it compiles, and what it needs per chip.
    *(
        Cell("sd15", 512, "v5e:2x2", "distill", "fsdp=4", 8, method=m)
        for m in ("reflow", "instaflow", "sid", "sfd", "dmd2", "lcm", "scm", "rcm")
    ),
    # The methods with a trained fake score beside the generator: SiD at batch 8 without remat needs 21.85 GiB of
    # temporaries per v5e chip (16 GiB), so the same step with block remat.
    *(
        Cell("sd15", 512, "v5e:2x2", "distill", "fsdp=4", 8, remat="blocks", method=m)
        for m in ("sid", "sfd", "dmd2", "rcm")
    ),
)
# Every plan twice: at XLA's default level (what training runs get; 10-35 min per SD-sized compile here) and at O0
# (3-6x faster to compile, in less than half the host memory; estimates, see O0_MARGIN).
GRID: tuple[Cell, ...] = (*_PLANS, *(dataclasses.replace(c, opt="O0") for c in _PLANS))

# An O0 compile's peak HBM was 7-8 % below the default level's on the cells compiled both ways (the SD1.5 train
# step at 128^2 and 512^2): an O0 plan counts as fitting only with this much of the chip to spare.
O0_MARGIN = 0.10


def source_key(task: str, root: Path = ROOT) -> str:
    """A hash of the contents of every file the task's programs depend on (SOURCES; committed or not)."""
    h = hashlib.sha256()
    for entry in SOURCES[task]:
        path = root / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def source_keys(root: Path = ROOT) -> dict[str, str]:
    return {task: source_key(task, root) for task in SOURCES}


def state(cell: Cell, workdir: Path, keys: dict[str, str]) -> tuple[str, dict | None]:
    """("done", result) | ("too_big", record) | ("stale", result) | ("failed", record) | ("missing", None).

    too_big: XLA refused the program for the chip's HBM (RESOURCE_EXHAUSTED), a result of this key, not retried."""
    path = workdir / f"{cell.name}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return "missing", None
    if record.get("key") != keys[cell.task]:
        return "stale", record
    if "failed" not in record:
        return "done", record
    return ("too_big" if "RESOURCE_EXHAUSTED" in record["failed"] else "failed"), record


def host_memory_gb() -> float | None:
    """This host's RAM in GB (Linux /proc/meminfo), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def rss_gb(pid: int) -> float:
    """A live process's resident memory in GB (Linux /proc; 0 where unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError):
        pass
    return 0.0


def run_guarded(cmd: list[str], timeout: int, max_rss_gb: float | None) -> tuple[int | None, str, str, str]:
    """Run cmd, killing it past `timeout` seconds or past `max_rss_gb` of resident memory (an SD-sized compile can
    take all of a small host's RAM, and the OOM killer then picks any process). Returns (returncode or None when
    killed here, stdout, stderr, why it was killed or "")."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
        start, peak, why = time.time(), 0.0, ""
        while proc.poll() is None:
            peak = max(peak, rss_gb(proc.pid))
            if max_rss_gb is not None and peak > max_rss_gb:
                why = (
                    f"the compile passed {max_rss_gb:.1f} GB of host memory after {time.time() - start:.0f} s "
                    "(--max-host-gb; a larger host may compile it)"
                )
            elif time.time() - start > timeout:
                why = f"compile ran past {timeout} s"
            if why:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.5)
        out.seek(0)
        err.seek(0)
        return (None if why else proc.returncode), out.read(), err.read(), why


def compute(cell: Cell, workdir: Path, key: str, timeout: int, max_rss_gb: float | None = None) -> dict:
    """Run the tool for one cell in a subprocess; write its record (the result, or why it failed) atomically."""
    out = workdir / f"{cell.name}.json"
    tmp = workdir / f"{cell.name}.partial.json"
    cmd = [
        "nice",
        "-n",
        "10",
        sys.executable,
        str(ROOT / "tools" / "aot_compile.py"),
        *cell.flags(),
        "--json",
        str(tmp),
    ]
    print("$ " + cell.command(), flush=True)
    start = time.time()
    returncode, stdout, stderr, why = run_guarded(cmd, timeout, max_rss_gb)
    if why:
        record = {"failed": why}
    elif returncode == 0:
        record = json.loads(tmp.read_text())
        print(stdout.strip(), flush=True)
    elif returncode < 0:  # a signal: the host's OOM killer, or a user; nothing about the program
        record = {"failed": f"the compile was killed by signal {-returncode} (host out of memory?)"}
    else:
        lines = [x for x in (stderr or stdout).strip().splitlines() if x.strip()]
        record = {"failed": lines[-1] if lines else f"exit status {returncode}"}
    lowered = re.search(r"program sha256 ([0-9a-f]+)", stderr or "")
    if "failed" in record and lowered:  # lowered, then refused or killed: the program it was, for --revalidate
        record["program_sha256"] = lowered.group(1)
    record.update(key=key, cell=dataclasses.asdict(cell), wall_s=round(time.time() - start, 1))
    fileio.atomic_write_text(out, json.dumps(record, indent=1, default=str) + "\n")
    tmp.unlink(missing_ok=True)
    if "failed" in record:
        print(f"  failed: {record['failed']}", flush=True)
    return record


def revalidate(cell: Cell, workdir: Path, key: str, timeout: int) -> bool:
    """A stale cell whose program has not changed is current again: lower the cell's program under today's sources
    (seconds to a minute, no compile) and compare its hash with the one the cell was compiled from. True when it
    matched and the cell was re-keyed (the record keeps the key it was computed under)."""
    path = workdir / f"{cell.name}.json"
    record = json.loads(path.read_text())
    if "program_sha256" not in record:
        print(f"  {cell.name}: no program hash recorded (computed by an older tool): recompute it", flush=True)
        return False
    tmp = workdir / f"{cell.name}.lowered.json"
    cmd = [sys.executable, str(ROOT / "tools" / "aot_compile.py"), *cell.flags(), "--lower-only", "--json", str(tmp)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        digest = json.loads(tmp.read_text())["program_sha256"] if proc.returncode == 0 else None
    except (subprocess.TimeoutExpired, OSError, ValueError):
        digest = None
    tmp.unlink(missing_ok=True)
    if digest != record["program_sha256"]:
        print(f"  {cell.name}: the program changed ({record['program_sha256']} -> {digest}): recompute it", flush=True)
        return False
    record.setdefault("computed_under_key", record["key"])
    record["key"] = key
    fileio.atomic_write_text(path, json.dumps(record, indent=1, default=str) + "\n")
    print(f"  {cell.name}: same program ({digest}): current again", flush=True)
    return True


def fits(cell: Cell, r: dict) -> bool:
    """XLA's peak within the chip's HBM; at O0 with O0_MARGIN of it to spare."""
    if cell.opt == "default":
        return bool(r.get("fits"))
    return r["peak_bytes"] <= (1.0 - O0_MARGIN) * r["hbm_capacity_bytes"]


def best(done: list[tuple[Cell, dict]]) -> dict | None:
    """The fitting result with the most images/s."""
    fitting = [r for c, r in done if fits(c, r) and r.get("images_per_s")]
    return max(fitting, key=lambda r: r["images_per_s"]) if fitting else None


def _gib(x) -> str:
    return f"{x / 2**30:.2f}"


def _row(cell: Cell, r: dict, mark: str = "") -> str:
    mesh = ",".join(f"{a}={n}" for a, n in r["mesh"].items() if n > 1) or "1"
    mesh += "" if cell.weights == "fp32" else f", {cell.weights} weights"
    trains = r["task"] in ("train", "distill")
    step = f"{1e3 * r['roofline_step_s']:.0f} ms" if trains else f"{r['roofline_step_s']:.2f} s/batch"
    mfu = f"≤ {100 * r['mfu']:.0f} %" if r.get("mfu") is not None and trains else "–"
    remat = cell.remat if trains else "–"
    what = f"{cell.method + ' ' if cell.method else ''}{cell.model} {cell.res}²"
    if fits(cell, r):
        verdict = "fits"
    elif r["fits"]:  # O0: within the chip, not within the margin
        verdict = f"**marginal** (< {100 * O0_MARGIN:.0f} % spare)"
    else:
        verdict = "**does not fit**"
    return (
        f"| {mark}{what} | {cell.topology} ({r['devices']}) | {mesh} | {remat} | {r['batch']} | {cell.opt} "
        f"| {_gib(r['peak_bytes'])} / {_gib(r['hbm_capacity_bytes'])} {verdict} | {step} | {r['images_per_s']:.1f} "
        f"| {mfu} | {r.get('compile_s', 0):.0f} s |"
    )


def fidelity(grid, states) -> list[str]:
    """The plans compiled at both levels: O0's figures against the default's."""
    lines = []
    for c in grid:
        if c.opt == "default" or states[c][0] != "done":
            continue
        ref = dataclasses.replace(c, opt="default")
        if ref not in states or states[ref][0] != "done":
            continue
        r0, r2 = states[c][1], states[ref][1]
        change = 100 * (r0["peak_bytes"] / r2["peak_bytes"] - 1)
        what = f"{c.task} {c.method + ' ' if c.method else ''}{c.model} {c.res}² {c.topology} {c.mesh} b{c.batch}"
        what += f" remat {c.remat}" if c.task != "sample" else ""
        what += "" if c.weights == "fp32" else f" {c.weights} weights"
        lines.append(
            f"| {what} | {r2['compile_s']:.0f} → {r0['compile_s']:.0f} s "
            f"| {_gib(r2['peak_bytes'])} → {_gib(r0['peak_bytes'])} ({change:+.1f} %) "
            f"| {r2['bytes_accessed_per_device'] / 1e9:.0f} → {r0['bytes_accessed_per_device'] / 1e9:.0f} GB "
            f"| {r2['images_per_s']:.1f} → {r0['images_per_s']:.1f} |"
        )
    if not lines:
        return []
    head = [
        "## O0 against the default level",
        "",
        "The plans compiled both ways (default → O0): XLA:TPU compile time on this host, peak HBM per chip, XLA's HBM "
        "traffic per chip and step, and the roofline images/s it implies.",
        "",
        "| plan | compile | peak GiB | HBM traffic | images/s |",
        "|---|---|---|---|---|",
    ]
    return head + lines + [""]


def markdown(grid, workdir: Path, keys: dict[str, str]) -> str:
    states = {cell: state(cell, workdir, keys) for cell in grid}
    lines = [
        "# TPU plans: Stable Diffusion training and sampling, compiled for TPU topologies on a CPU host",
        "",
        "Written by `python tools/tpu_plans.py` from the cells it compiled with `tools/aot_compile.py` (XLA:TPU "
        "from libtpu, abstract parameters, no chips). Per chip: XLA's peak HBM (arguments + outputs − donated "
        "aliases + temporaries + code) against the chip's capacity; the roofline step time (the larger of compute "
        "at the chip's bf16 peak and XLA's HBM traffic at its bandwidth), the images/s it implies and the model "
        "FLOPs utilisation at that time (an upper bound: real steps run slower than the roofline). Training: the "
        "trainer's step (AdamW, EMA, bf16 compute, float32 parameters), splash attention; sampling: 50 DDIM steps "
        "with classifier-free guidance plus the VAE decode. XLA: the compiler's optimisation level — `default` is "
        "what a training run gets; `O0` compiles 3-6x faster here in less than half the host memory, but leaves out "
        "the default's asynchronous prefetches and extra all-gathers: its peak HBM came out 7-8 % lower and its "
        f"HBM traffic about half (see the comparison below), so an O0 plan fits only with {100 * O0_MARGIN:.0f} % "
        "of the chip to spare and its roofline is optimistic. **Bold**: the best plan of its group and level (most "
        "images/s among those that fit). Source keys "
        + ", ".join(f"{t} `{k}`" for t, k in keys.items())
        + " (hashes of the files each task's programs depend on); cells of other keys are stale and left out.",
        "",
    ]
    for task, title in (("train", "Training"), ("sample", "Sampling"), ("distill", "Distillation steps (issue 13)")):
        cells = [c for c in grid if c.task == task]
        if not cells:
            continue
        lines += [
            f"## {title}",
            "",
            "| model | topology (chips) | mesh | remat | global batch | XLA | peak GiB / chip | step | images/s "
            "| MFU | compile |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        groups = dict.fromkeys(c.group for c in cells)
        for group in groups:
            for level in ("default", "O0"):
                done = [
                    (c, states[c][1]) for c in cells if c.group == group and c.opt == level and states[c][0] == "done"
                ]
                top = best(done)
                for c, r in done:
                    lines.append(_row(c, r, "**best** " if r is top else ""))
        lines.append("")
    lines += fidelity(grid, states)
    too_big = [(c, r) for c, (s, r) in states.items() if s == "too_big"]
    if too_big:
        lines += ["## Does not fit", ""]
        for c, r in too_big:
            lines.append(f"- `{c.command()}`: {r['failed'].split('RESOURCE_EXHAUSTED: ')[-1]}")
        lines.append("")
    pending = [(c, s) for c, (s, _) in states.items() if s not in ("done", "too_big")]
    if pending:
        lines += [f"## Not computed yet ({len(pending)} of {len(grid)} cells)", ""]
        for c, s in pending:
            why = s if s != "failed" else f"failed: {states[c][1]['failed']}"
            lines.append(f"- {why}: `{c.command()}`")
        lines += ["", "Compute them with `python tools/tpu_plans.py --run all` (or `--run N` for the next N).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--run",
        default="0",
        help="compute this many missing/stale/failed cells first (not those that do not fit), or 'all'",
    )
    p.add_argument(
        "--only",
        default="",
        help="comma-separated models, topologies, tasks or distillation methods to restrict to; values of one kind "
        "are alternatives, kinds combine: sd15,sd21,sample = the sd15 or sd21 sampling cells",
    )
    p.add_argument(
        "--workdir", default="docs/tpu_plans_cells", help="one JSON per cell (kept in git: the table's data)"
    )
    p.add_argument("--out", default="docs/tpu_plans.md")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per compile")
    total = host_memory_gb()
    p.add_argument(
        "--max-host-gb",
        type=float,
        default=round(0.8 * total, 1) if total else None,
        help="kill a compile whose resident memory passes this (default: 80%% of this host's RAM)",
    )
    p.add_argument("--list", action="store_true", help="print every cell and its state, then exit")
    p.add_argument(
        "--revalidate",
        action="store_true",
        help="first re-key each stale cell whose lowered program is unchanged (a lowering each, no compile)",
    )
    args = p.parse_args(argv)
    if args.run != "all" and not args.run.isdigit():
        p.error(f"--run {args.run!r}: a number of cells or 'all'")
    grid = select(GRID, args.only)
    if not grid:
        p.error(
            f"--only {args.only!r} matches no cell (models: sd15, sd21, sdxl; topologies: v5e:4x4, ...; "
            "tasks: train, sample, distill; distillation methods: lcm, ...)"
        )
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    keys = source_keys()
    if args.list:
        for c in grid:
            print(f"{state(c, workdir, keys)[0]:8s} {c.command()}")
        return 0
    if args.revalidate:
        for c in grid:
            if state(c, workdir, keys)[0] == "stale":
                revalidate(c, workdir, keys[c.task], args.timeout)
    todo = [c for c in grid if state(c, workdir, keys)[0] not in ("done", "too_big")]
    todo = todo if args.run == "all" else todo[: int(args.run)]
    for i, c in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}]", end=" ", flush=True)
        compute(c, workdir, keys[c.task], args.timeout, args.max_host_gb)
        now = source_keys()
        changed = {t for t in now if now[t] != keys[t]}
        if changed & {later.task for later in todo[i + 1 :]}:
            # A later cell would be compiled under sources other than its key's; edits to another task's files
            # (distillation code during a train queue) leave this queue's cells as they were.
            print(f"the {', '.join(sorted(changed))} sources changed during the compile: stopping", flush=True)
            break
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The table is always the whole grid: --only restricts what is computed, not what the table shows.
    fileio.atomic_write_text(out, markdown(GRID, workdir, keys) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
