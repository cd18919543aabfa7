"""Several processes: jax.distributed from the environment, batch placement, gathering,
primary-only writes, and two CPU processes on localhost (4 fake devices each, 8 global)
against one process with 8 devices (tests/_multihost_worker.py runs in each process).

The 2-process runs use JAX's gloo CPU collectives (jax 0.10: ``jax_cpu_collectives_
implementation='gloo'``, the default). Each run is bounded by a deadline: a hang (a process
waiting in a collective for a peer that died) fails the test instead of blocking CI.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from t2i_mia.errors import ConfigError
from t2i_mia.parallel import distributed as D
from t2i_mia.parallel.mesh import make_mesh, process_rows, shard_batch

WORKER = pathlib.Path(__file__).with_name("_multihost_worker.py")
DEADLINE_S = 600  # a whole run (both processes); ~1 min each on a loaded 2-core machine
DIST_VARS = (D.ENV_MODE, D.ENV_COORDINATOR, D.ENV_NUM_PROCESSES, D.ENV_PROCESS_ID,
             D.ENV_LOCAL_DEVICE_IDS, D.ENV_INIT_TIMEOUT)


# ----------------------------------------------------------------------------- the plan

def no_tpu(env):
    return 0


def test_nothing_set_is_single_process():
    plan = D.plan_from_env({}, tpu_probe=no_tpu)
    assert plan.kind == "single"
    assert D.initialize_from_env({D.ENV_MODE: "off"}).kind == "single"
    assert not jax.distributed.is_initialized()
    assert D.is_primary() and jax.process_count() == 1
    with pytest.raises(ValueError):
        plan.initialize_kwargs()


def test_explicit_plan():
    env = {D.ENV_COORDINATOR: "10.0.0.1:1234", D.ENV_NUM_PROCESSES: "4",
           D.ENV_PROCESS_ID: "3", D.ENV_LOCAL_DEVICE_IDS: "0,1", D.ENV_INIT_TIMEOUT: "60"}
    plan = D.plan_from_env(env, tpu_probe=no_tpu)
    assert plan.kind == "explicit"
    assert plan.initialize_kwargs() == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
        "local_device_ids": [0, 1], "initialization_timeout": 60,
        "cluster_detection_method": "deactivate"}
    # an explicit coordinator wins over TPU detection
    assert D.plan_from_env(env, tpu_probe=lambda e: 4).kind == "explicit"


@pytest.mark.parametrize("env,names", [
    ({D.ENV_COORDINATOR: "h:1234", D.ENV_PROCESS_ID: "0"}, [D.ENV_NUM_PROCESSES]),
    ({D.ENV_COORDINATOR: "h:1234", D.ENV_NUM_PROCESSES: "2"}, [D.ENV_PROCESS_ID]),
    ({D.ENV_COORDINATOR: "h:1234", D.ENV_NUM_PROCESSES: "2", D.ENV_PROCESS_ID: "2"},
     [D.ENV_PROCESS_ID, "< T2I_MIA_NUM_PROCESSES=2"]),
    ({D.ENV_COORDINATOR: "h:1234", D.ENV_NUM_PROCESSES: "two", D.ENV_PROCESS_ID: "0"},
     [D.ENV_NUM_PROCESSES, "'two'"]),
    ({D.ENV_COORDINATOR: "h:1234", D.ENV_NUM_PROCESSES: "0", D.ENV_PROCESS_ID: "0"},
     [D.ENV_NUM_PROCESSES, ">= 1"]),
    ({D.ENV_COORDINATOR: "hostonly", D.ENV_NUM_PROCESSES: "2", D.ENV_PROCESS_ID: "0"},
     [D.ENV_COORDINATOR, "host:port"]),
    ({D.ENV_COORDINATOR: "h:99999", D.ENV_NUM_PROCESSES: "2", D.ENV_PROCESS_ID: "0"},
     [D.ENV_COORDINATOR]),
    ({D.ENV_COORDINATOR: "h:1", D.ENV_NUM_PROCESSES: "2", D.ENV_PROCESS_ID: "0",
      D.ENV_LOCAL_DEVICE_IDS: "0,0"}, [D.ENV_LOCAL_DEVICE_IDS, "distinct"]),
    ({D.ENV_NUM_PROCESSES: "2", D.ENV_PROCESS_ID: "0"}, [D.ENV_NUM_PROCESSES, D.ENV_COORDINATOR]),
    ({D.ENV_MODE: "mpi"}, [D.ENV_MODE, "'mpi'"]),
    ({D.ENV_MODE: "jax", D.ENV_COORDINATOR: "h:1"}, [D.ENV_MODE, D.ENV_COORDINATOR]),
    ({D.ENV_INIT_TIMEOUT: "soon"}, [D.ENV_INIT_TIMEOUT]),
])
def test_bad_environment_names_the_variable(env, names):
    with pytest.raises(ConfigError) as e:
        D.plan_from_env(env, tpu_probe=no_tpu)
    for name in names:
        assert name in str(e.value)


def test_tpu_detection():
    # multi-worker slice, or a TPU VM whose worker count cannot be read: let JAX detect
    for workers in (4, -1):
        plan = D.plan_from_env({}, tpu_probe=lambda e, w=workers: w)
        assert plan.kind == "tpu"
        assert plan.initialize_kwargs() == {"initialization_timeout": 300}
    assert D.plan_from_env({}, tpu_probe=lambda e: 1).kind == "single"  # e.g. a v4-8
    assert D.plan_from_env({D.ENV_MODE: "off"}, tpu_probe=lambda e: 4).kind == "single"
    assert D.plan_from_env({D.ENV_MODE: "jax"}, tpu_probe=no_tpu).kind == "jax"
    assert D.tpu_worker_count({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5"}
                              ) == 4
    assert D.tpu_worker_count({"TPU_PROCESS_ADDRESSES": "a:8476,b:8476"}) == 2


def test_on_tpu_vm(monkeypatch):
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(D.glob, "glob", lambda pattern: ["/dev/vfio/0"] if "vfio" in pattern
                        else [])
    assert D.on_tpu_vm()
    monkeypatch.setattr(D.glob, "glob", lambda pattern: [])
    assert not D.on_tpu_vm()  # libtpu installed but no TPU device
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(D.glob, "glob", lambda pattern: ["/dev/accel0"])
    assert not D.on_tpu_vm()


def test_tpu_worker_count_from_metadata_server():
    """The GCE metadata query, against a local stand-in server."""
    import http.server
    import threading

    seen = []

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Metadata-Flavor")))
            body = b"unknown:unknown:10.0.0.2,unknown:unknown:10.0.0.3,unknown:unknown:10.0.0.4"
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host = f"127.0.0.1:{server.server_port}"
        assert D.tpu_worker_count({"GCE_METADATA_IP": host}) == 3
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [("/computeMetadata/v1/instance/attributes/worker-network-endpoints",
                     "Google")]
    # nothing listening: unknown (None), and JAX's own detection would decide
    assert D.tpu_worker_count({"GCE_METADATA_IP": host}, timeout_s=2) is None


def test_initialize_after_jax_started_is_a_clear_error():
    jax.devices()  # the backend is up (as it is in this test process)
    env = {D.ENV_COORDINATOR: "127.0.0.1:1", D.ENV_NUM_PROCESSES: "2", D.ENV_PROCESS_ID: "1",
           D.ENV_INIT_TIMEOUT: "5"}
    with pytest.raises(ConfigError, match="before any JAX computation"):
        D.initialize_from_env(env)
    assert not jax.distributed.is_initialized()


# ----------------------------------------------------------------------------- one process

def test_process_rows_and_local_batches_one_process():
    mesh = make_mesh(model=2)  # 4 data shards
    np.testing.assert_array_equal(process_rows(mesh, 12), np.arange(12))
    with pytest.raises(ConfigError, match="4 data shards"):
        process_rows(mesh, 10)
    x = np.arange(12 * 2, dtype=np.float32).reshape(12, 2)
    a = shard_batch({"x": x}, mesh)["x"]
    b = shard_batch({"x": x[process_rows(mesh, 12)]}, mesh, process_local=True)["x"]
    assert a.sharding == b.sharding and a.shape == b.shape == (12, 2)
    np.testing.assert_array_equal(D.gather_to_host(a), x)
    np.testing.assert_array_equal(D.gather_to_host(b), x)
    with pytest.raises(ConfigError, match="process-local batch leaf 'x'"):
        shard_batch({"x": x[:6]}, mesh, process_local=True)
    out = D.gather_to_host({"a": a, "n": np.int32(3)})
    assert isinstance(out["a"], np.ndarray) and out["n"] == 3
    D.barrier("one-process")  # no-op


def test_report_written_by_primary_only(tmp_path, monkeypatch):
    from test_report import _report

    from t2i_mia.report import writer
    report, curves = _report()
    monkeypatch.setattr(writer, "is_primary", lambda: False)
    paths = writer.write_report(tmp_path / "other", report, curves)
    assert set(paths) == {"json", "md", "roc"} and not (tmp_path / "other").exists()
    with pytest.raises(Exception, match="manifest_sha256"):  # still validated everywhere
        writer.write_report(tmp_path / "bad", dict(report, manifest_sha256="x"), curves)
    monkeypatch.setattr(writer, "is_primary", lambda: True)
    writer.write_report(tmp_path / "primary", report, curves)
    assert (tmp_path / "primary" / "report.json").exists()


# ----------------------------------------------------------------------------- two processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _launch(mode: str, out: pathlib.Path, n_proc: int) -> dict:
    """Runs the worker on ``n_proc`` processes (8 devices in all); returns process 0's npz."""
    out.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):  # a second try only if the free port was taken meanwhile
        port = _free_port()
        procs, logs = [], []
        for pid in range(n_proc):
            extra = {} if n_proc == 1 else {
                D.ENV_COORDINATOR: f"127.0.0.1:{port}", D.ENV_NUM_PROCESSES: n_proc,
                D.ENV_PROCESS_ID: pid, D.ENV_INIT_TIMEOUT: 120}
            log = open(out / f"{mode}.p{pid}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, str(WORKER), mode, str(out)],
                                          env=_env(8 // n_proc, **extra), stdout=log,
                                          stderr=subprocess.STDOUT))
        deadline = time.monotonic() + DEADLINE_S
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
        codes = [p.returncode for p in procs]
        if all(c == 0 for c in codes):
            return dict(np.load(out / f"{mode}.npz"))
        if attempt == 0 and any("address already in use" in t.lower() for t in texts):
            continue
        tails = "\n".join(f"--- process {i} (exit {c}) ---\n{t[-3000:]}"
                          for i, (c, t) in enumerate(zip(codes, texts)))
        pytest.fail(f"{mode} on {n_proc} process(es) failed or passed the {DEADLINE_S} s "
                    f"deadline (exit codes {codes}):\n{tails}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost_train")
    return (_launch("train", root / "one", 1), _launch("train", root / "two", 2), root)


@pytest.fixture(scope="module")
def generate_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost_generate")
    return _launch("generate", root / "one", 1), _launch("generate", root / "two", 2)


@pytest.mark.slow
def test_two_processes_train_like_one(train_runs):
    """3 Adam steps (dropout MLP, EMA) on the 8x1 and 4x2 meshes, and the training loop with
    a checkpoint resume, on 2 processes x 4 devices equal 1 process x 8 devices.

    Same mesh shape, same partitioned program: the only difference is that the gradient
    all-reduce crosses processes (gloo) and may sum in another order, a few float32 ulp
    (measured: at most 3e-8 on parameters of size ~0.3). rtol=1e-5, atol=1e-6 as in
    tests/test_mesh.py; the parameters moved by > 1e-2, far beyond it."""
    one, two, root = train_runs
    assert sorted(one) == sorted(two)
    worst = 0.0
    for key in sorted(one):
        if key.startswith("ckpt/"):
            continue
        a, b = one[key], two[key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        if a.dtype.kind in "iu":  # step counters, RNG keys
            np.testing.assert_array_equal(b, a, err_msg=key)
        else:
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=key)
            worst = max(worst, float(np.max(np.abs(b.astype(np.float64) - a))))
    print(f"max |2 processes - 1 process| over states and losses: {worst:.3g}")
    for name in ("mesh8x1", "mesh4x2", "loop"):
        assert int(one[f"{name}/state/step"]) == (4 if name == "loop" else 3)
    kernel = one["mesh8x1/state/params/Dense_0/kernel"]
    assert np.abs(kernel - one["init/Dense_0/kernel"]).max() > 1e-2  # training moved it
    assert np.abs(kernel - one["mesh4x2/state/params/Dense_0/kernel"]).max() < 1e-5
    # One checkpoint folder per step, written once (no per-process copies, no leftovers):
    # steps 1, 2 (every step), then 4 at the end of the resumed run.
    for run in (one, two):
        np.testing.assert_array_equal(run["ckpt/steps"], [1, 2, 4])
        assert list(run["ckpt/entries"]) == ["1", "2", "4"]
    # write_report called by both processes into their own folders: only process 0 wrote.
    assert (root / "two" / "report_p0" / "report.json").exists()
    assert not (root / "two" / "report_p1").exists()


@pytest.mark.slow
def test_two_processes_sample_like_one(generate_runs):
    """The LDM target's sharded sampler (text encoder, guided DDIM with eta > 0, VAE decode,
    uint8) on 2 processes equals LDMTarget.generate on 1 process with 8 devices.

    Tolerance: the programs are the same; only collectives differ in reduction order, so a
    pixel can flip by one uint8 level at a .5 boundary (measured: 3e-5 of pixels)."""
    one, two = generate_runs
    ref = one["generate"]
    assert ref.shape == (5, 2, 16, 16, 3) and ref.dtype == np.uint8
    assert ref.std() > 10 and not np.array_equal(ref[0, 0], ref[0, 1])  # not a blank image
    np.testing.assert_array_equal(one["sampler"], ref)  # the worker's inputs = generate's
    diff = np.abs(two["sampler"].astype(int) - ref.astype(int))
    print(f"2 processes vs 1: max {diff.max()} uint8 levels, {(diff > 0).mean():.2e} of pixels")
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


@pytest.mark.slow
def test_two_processes_ldm_target_generate(generate_runs):
    """LDMTarget.generate itself on 2 processes (each places only its rows of every batch
    with mesh.shard_batch) equals one process."""
    one, two = generate_runs
    assert "generate_error" not in two, two.get("generate_error")
    diff = np.abs(two["generate"].astype(int) - one["generate"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
