"""Multi-process runs on jax.distributed: initialisation (explicit, from launch/local.sh's environment, or
auto-detected on TPU pods and SLURM) and a coordination-service barrier."""

from __future__ import annotations

import os

import jax

_count = [0]  # barrier ids must be unique per use


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, auto: bool = False
) -> None:
    """jax.distributed.initialize before anything touches a device: explicit (local gloo runs) or auto-detected
    (TPU pod workers, SLURM). CPU collectives go over gloo."""
    if not (coordinator or auto):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects CPU devices
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Multi-process: wait until every process gets here, through the coordination service (no device collective).

    Used after compiling: one host may take minutes longer than another (e.g. a compilation-cache miss), longer
    than the collectives' connection timeout at the first step.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        return
    _count[0] += 1
    client.wait_at_barrier(f"jaxdiff_{_count[0]}_{name.replace(' ', '_')}", timeout_in_ms=timeout_s * 1000)


def initialize_distributed_from_env() -> None:
    """`initialize_distributed` from JAXDIFF_COORDINATOR, JAXDIFF_NUM_PROCESSES, JAXDIFF_PROCESS_ID (local.sh)."""
    coordinator = os.environ.get("JAXDIFF_COORDINATOR")
    if coordinator:
        initialize_distributed(
            coordinator, int(os.environ["JAXDIFF_NUM_PROCESSES"]), int(os.environ["JAXDIFF_PROCESS_ID"])
        )
