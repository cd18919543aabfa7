"""Several processes (multi-host): ``jax.distributed`` set up from the environment.

Call :func:`initialize_from_env` first thing in an entry point, before any JAX computation.
What it does depends on the environment:

* ``T2I_MIA_COORDINATOR=host:port`` set (GPU or CPU clusters, or several processes on one
  machine): ``jax.distributed.initialize`` with that coordinator (process 0's address; the
  port must be free there and reachable from every process) and

  - ``T2I_MIA_NUM_PROCESSES``: number of processes (required),
  - ``T2I_MIA_PROCESS_ID``: this process's id, ``0 .. N-1`` (required),
  - ``T2I_MIA_LOCAL_DEVICE_IDS``: optional, comma-separated local device ids this process
    uses (e.g. one GPU per process: ``0``, ``1``, ...; default: all local devices).

  Cluster auto-detection is switched off in this mode, so the variables alone decide. On
  CPU the cross-process collectives go through gloo (``jax_cpu_collectives_implementation``,
  set to ``gloo`` here when it is ``none``; jax 0.10 defaults to ``gloo``).
* Nothing set, on a Cloud TPU VM (``libtpu`` installed and a TPU device file) whose slice has
  more than one worker: ``jax.distributed.initialize()`` with no arguments; JAX reads the
  coordinator, process count and id from the TPU metadata server. The worker count comes
  from ``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` or the metadata server's
  ``worker-network-endpoints``; if it cannot be read, JAX's own detection decides.
* ``T2I_MIA_DISTRIBUTED``: ``auto`` (default, the two rules above), ``off`` (never
  initialise: one process even on a pod; each TPU worker would then run alone), or ``jax``
  (``jax.distributed.initialize()`` with no arguments: JAX's own detection of TPU, Slurm,
  Open MPI, Kubernetes ...).
* ``T2I_MIA_INIT_TIMEOUT_S``: seconds to wait for every process to join (default 300).

Otherwise it does nothing: one process, the usual single-host run.

The mesh (:func:`t2i_mia.parallel.mesh.make_mesh`) then spans every process's devices. Each
process holds the rows of a global batch its devices hold
(:func:`t2i_mia.parallel.mesh.process_rows`); :func:`t2i_mia.parallel.mesh.shard_batch` builds
global arrays; :func:`gather_to_host` brings a global array back to every host for writing;
files are written by the primary process only (:func:`is_primary`; orbax checkpoints
coordinate their writers themselves).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from t2i_mia.errors import ConfigError

PyTree = Any
log = logging.getLogger(__name__)

ENV_MODE = "T2I_MIA_DISTRIBUTED"
ENV_COORDINATOR = "T2I_MIA_COORDINATOR"
ENV_NUM_PROCESSES = "T2I_MIA_NUM_PROCESSES"
ENV_PROCESS_ID = "T2I_MIA_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "T2I_MIA_LOCAL_DEVICE_IDS"
ENV_INIT_TIMEOUT = "T2I_MIA_INIT_TIMEOUT_S"
MODES = ("auto", "off", "jax")

_METADATA_URL = ("http://{host}/computeMetadata/v1/instance/attributes/"
                 "worker-network-endpoints")


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
    """What :func:`initialize_from_env` does.

    kind: ``single`` (nothing), ``explicit`` (from the T2I_MIA_* variables), ``tpu`` (a
    multi-worker TPU VM slice) or ``jax`` (JAX's own cluster detection). The other fields are
    the explicit settings (None when JAX detects them).
    """
    kind: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    timeout_s: int = 300

    def initialize_kwargs(self) -> dict:
        """Keyword arguments of ``jax.distributed.initialize`` for this plan."""
        if self.kind == "single":
            raise ValueError("a single-process plan does not initialise jax.distributed")
        kw: dict[str, Any] = {"initialization_timeout": self.timeout_s}
        if self.kind == "explicit":
            kw.update(coordinator_address=self.coordinator, num_processes=self.num_processes,
                      process_id=self.process_id, cluster_detection_method="deactivate")
            if self.local_device_ids is not None:
                kw["local_device_ids"] = list(self.local_device_ids)
        return kw


def _int_env(environ: Mapping[str, str], name: str, minimum: int) -> int:
    raw = environ.get(name)
    if raw is None or not raw.strip():
        raise ConfigError(f"{name} must be set when {ENV_COORDINATOR} is set "
                          f"({ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} "
                          f"go together)")
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value}: must be >= {minimum}")
    return value


def on_tpu_vm() -> bool:
    """A Cloud TPU VM: libtpu is installed and a TPU device file exists (``/dev/accel*`` on
    v2-v4, ``/dev/vfio/<n>`` on v5e/v5p/v6e). Reads no network."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def tpu_worker_count(environ: Mapping[str, str] | None = None,
                     timeout_s: float = 5.0) -> int | None:
    """Number of workers (hosts) of this TPU slice, or None if it cannot be read.

    ``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` (comma-separated) when set, else the
    GCE metadata server's ``worker-network-endpoints`` (one entry per worker). Call it on a
    TPU VM only (elsewhere the metadata server does not answer and this waits ``timeout_s``).
    """
    environ = os.environ if environ is None else environ
    for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        value = environ.get(name, "").strip()
        if value:
            return len([w for w in value.split(",") if w.strip()])
    url = _METADATA_URL.format(host=environ.get("GCE_METADATA_IP", "metadata.google.internal"))
    request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            text = response.read().decode("utf-8", "replace").strip()
    except (urllib.error.URLError, OSError, ValueError) as e:
        log.warning("TPU worker count: metadata server unreadable (%s); leaving it to "
                    "jax.distributed's own detection", e)
        return None
    return len([w for w in text.split(",") if w.strip()]) or None


def plan_from_env(environ: Mapping[str, str] | None = None,
                  tpu_probe: Callable[[Mapping[str, str]], int] | None = None
                  ) -> DistributedPlan:
    """Reads the environment (see the module docstring) into a :class:`DistributedPlan`.

    ``tpu_probe(environ)``: 0 when not on a TPU VM, else the slice's worker count (-1 when
    unknown); default: :func:`on_tpu_vm` and :func:`tpu_worker_count`. Bad or incomplete
    variables -> ConfigError naming the variable.
    """
    environ = os.environ if environ is None else environ
    mode = environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ConfigError(f"{ENV_MODE}={environ[ENV_MODE]!r}: expected one of {MODES}")
    timeout = 300
    if environ.get(ENV_INIT_TIMEOUT, "").strip():
        timeout = _int_env(environ, ENV_INIT_TIMEOUT, 1)
    coordinator = environ.get(ENV_COORDINATOR, "").strip()
    if mode == "off":
        return DistributedPlan("single", timeout_s=timeout)
    if coordinator:
        if mode == "jax":
            raise ConfigError(f"{ENV_MODE}=jax lets JAX detect the cluster; unset "
                              f"{ENV_COORDINATOR} or use {ENV_MODE}=auto")
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{ENV_COORDINATOR}={coordinator!r}: expected host:port "
                              f"(process 0's address and a free port)")
        n = _int_env(environ, ENV_NUM_PROCESSES, 1)
        pid = _int_env(environ, ENV_PROCESS_ID, 0)
        if pid >= n:
            raise ConfigError(f"{ENV_PROCESS_ID}={pid}: must be < {ENV_NUM_PROCESSES}={n}")
        local = None
        raw = environ.get(ENV_LOCAL_DEVICE_IDS, "").strip()
        if raw:
            try:
                local = tuple(int(v) for v in raw.split(","))
            except ValueError:
                raise ConfigError(f"{ENV_LOCAL_DEVICE_IDS}={raw!r}: expected comma-separated "
                                  f"integers, e.g. 0,1") from None
            if any(v < 0 for v in local) or len(set(local)) != len(local):
                raise ConfigError(f"{ENV_LOCAL_DEVICE_IDS}={raw!r}: expected distinct "
                                  f"non-negative device ids")
        return DistributedPlan("explicit", coordinator, n, pid, local, timeout)
    for name in (ENV_NUM_PROCESSES, ENV_PROCESS_ID, ENV_LOCAL_DEVICE_IDS):
        if environ.get(name, "").strip():
            raise ConfigError(f"{name} is set but {ENV_COORDINATOR} is not (set "
                              f"{ENV_COORDINATOR}=host:port of process 0 as well)")
    if mode == "jax":
        return DistributedPlan("jax", timeout_s=timeout)
    if tpu_probe is None:
        def tpu_probe(env):
            if not on_tpu_vm():
                return 0
            count = tpu_worker_count(env)
            return -1 if count is None else count
    workers = tpu_probe(environ)
    if workers > 1 or workers == -1:
        return DistributedPlan("tpu", timeout_s=timeout)
    return DistributedPlan("single", timeout_s=timeout)


def _ensure_cpu_collectives() -> None:
    """Cross-process CPU collectives need an implementation; gloo ships with jaxlib."""
    if jax.config.values.get("jax_cpu_collectives_implementation") in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize_from_env(environ: Mapping[str, str] | None = None) -> DistributedPlan:
    """Initialises ``jax.distributed`` as the environment says (module docstring); a no-op
    for one process or when already initialised. Must run before any JAX computation
    (ConfigError otherwise). Returns the plan it followed."""
    plan = plan_from_env(environ)
    if plan.kind == "single" or jax.distributed.is_initialized():
        return plan
    _ensure_cpu_collectives()
    try:
        jax.distributed.initialize(**plan.initialize_kwargs())
    except RuntimeError as e:
        if "before" in str(e):
            raise ConfigError(f"jax.distributed ({plan.kind}): initialize_from_env() must run "
                              f"before any JAX computation; call it first in the entry point "
                              f"({e})") from e
        raise
    log.info("jax.distributed: process %d of %d, %d local / %d global devices (%s)",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count(), plan.kind)
    return plan


def is_primary() -> bool:
    """True on the process that writes files (process 0; the only one on a single host)."""
    return jax.process_index() == 0


def describe() -> str:
    """One line for a ``--dry-run`` plan: processes and devices."""
    return (f"{jax.process_count()} process(es), process {jax.process_index()}, "
            f"{jax.local_device_count()} local / {jax.device_count()} global "
            f"{jax.default_backend()} devices")


def gather_to_host(tree: PyTree) -> PyTree:
    """Every leaf as a numpy array holding the *global* value, on every process.

    Arrays that span other processes' devices (e.g. a batch sharded over a multi-host mesh)
    are all-gathered (``multihost_utils.process_allgather``): a collective, so every process
    must call this with the same tree. Replicated or process-local arrays are copied to host
    as they are. One process: ``jax.device_get``.
    """
    def one(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
