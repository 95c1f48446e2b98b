"""Start-up of JAX's distributed runtime for multi-process (multi-host) data-parallel training.

Every process of a job runs the same command. `initialize` calls `jax.distributed.initialize` when the
flags or the environment say the process is one of several:
  * explicit `--coordinator_address`, `--num_processes`, `--process_id` (anything, loopback included);
  * `JAX_COORDINATOR_ADDRESS` in the environment (JAX reads the rest from it and its cluster detection);
  * a SLURM job step with more than one task, or an Open MPI job with more than one rank;
  * a Cloud TPU VM (libtpu installed): JAX detects the slice from the TPU metadata; a single-host TPU VM
    where nothing is detected runs as one process.
After it, `jax.devices()` lists the devices of every process and the training code builds one global mesh.
On the CPU backend collectives between processes go over gloo (TCP), which is how the loopback test runs.
"""

import importlib.util
import os
from collections.abc import Mapping

import jax
import orbax.checkpoint as ocp
from absl import logging

MODES = ("auto", "on", "off")


def detected_cluster(environ: Mapping[str, str]) -> str | None:
    """Name of the multi-process environment this process runs in, or None."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return "SLURM"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "Open MPI"
    if environ.get("MEGASCALE_COORDINATOR_ADDRESS") or "," in environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "Cloud TPU slice"
    if importlib.util.find_spec("libtpu") is not None:
        return "Cloud TPU VM"
    return None


def initialize(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> bool:
    """Joins the distributed job if there is one; must run before anything touches a JAX device.

    Args:
      mode: `auto` (explicit flags, else the environment decides), `on` (always; JAX's cluster detection
        must then find the job) or `off` (single process, flags must be unset).
      coordinator_address: host:port of process 0's coordinator service.
      num_processes: processes in the job.
      process_id: this process's index, 0..num_processes-1.
      environ: the environment to inspect.

    Returns:
      whether `jax.distributed.initialize` was called.

    Raises:
      ValueError: naming the flag, for an unknown mode, a partial or inconsistent set of the three flags.
    """
    if mode not in MODES:
        raise ValueError(f"--distributed={mode!r}: must be one of {MODES}")
    explicit = {
        "--coordinator_address": coordinator_address,
        "--num_processes": num_processes,
        "--process_id": process_id,
    }
    given = [k for k, v in explicit.items() if v is not None]
    if mode == "off":
        if given:
            raise ValueError(f"--distributed=off contradicts {', '.join(given)}")
        return False
    if given and len(given) < len(explicit):
        missing = [k for k in explicit if k not in given]
        raise ValueError(f"{', '.join(given)} given without {', '.join(missing)}: pass all three or none")
    if given:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process_id={process_id} must be in 0..--num_processes-1 (--num_processes={num_processes})"
            )
        _use_gloo_on_cpu()
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        )
        return True
    cluster = detected_cluster(environ)
    if mode == "auto" and cluster is None:
        return False
    _use_gloo_on_cpu()
    try:
        jax.distributed.initialize()
    except ValueError as e:
        # JAX found no job to join (JAX raises before creating any state). A single-host TPU VM is one.
        if mode == "on" or cluster != "Cloud TPU VM":
            raise ValueError(
                f"--distributed={mode}: JAX could not set up the multi-process job ({e}); "
                "pass --coordinator_address, --num_processes and --process_id"
            ) from e
        logging.info("Cloud TPU VM without a multi-host slice: running as one process.")
        return False
    logging.info("Joined a %s job as process %d of %d.", cluster, jax.process_index(), jax.process_count())
    return True


def _use_gloo_on_cpu() -> None:
    """Cross-process collectives for the CPU backend (GPU and TPU backends have their own)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


# gloo sets up its connections at a job's first CPU collective and waits only 30 s there for the other
# processes (a fixed timeout in XLA). `jax.distributed.initialize` waits for all processes, but what comes
# after it (reading the train split, initialising the model) can take one process 30 s longer than another on
# a loaded machine: in CI both then failed at the first collective ("Gloo context initialization failed:
# DEADLINE_EXCEEDED: GetKeyValue() timed out"). So the processes meet first at a barrier of the coordination
# service, which waits as long as this.
BARRIER_TIMEOUT_S = 600


def wait_for_all_processes(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
    """Blocks until every process of the job has called this with the same `name` (each name once), over
    the distributed runtime's coordination service, not a collective; nothing when there is one process.

    Raises:
      jax.errors.JaxRuntimeError (DEADLINE_EXCEEDED): not all processes arrived within `timeout_s`.
    """
    ocp.multihost.get_barrier_sync_fn()(key=f"fastscnn_jax:{name}", timeout_ms=timeout_s * 1000)
