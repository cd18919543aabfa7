"""The entry points' persistent XLA compilation cache (``cli.use_compile_cache``): programs
that lower to the same HLO (the train steps and samplers of an audit's target, shadow, null
and reference models are new function objects of one architecture) compile once, and the
cached program computes what a fresh compile does."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import jax, jax.numpy as jnp
    from jax import monitoring
    from t2i_mia import cli
    events = []
    monitoring.register_event_listener(lambda name, **kw: events.append(name))
    path = cli.use_compile_cache(sys.argv[1], enabled=sys.argv[2] == "on", min_compile_s=0.0)

    def program():  # a new function object per call, as each model's train step is
        return jax.jit(lambda x: jnp.tanh(x @ x.T).sum())

    x = jnp.arange(256.0).reshape(16, 16) / 256
    before = events.count("/jax/compilation_cache/cache_hits")
    a = float(program()(x))
    b = float(program()(x))
    print(json.dumps({"path": path, "a": a, "b": b,
                      "entries": len(os.listdir(path)) if path else 0,
                      "hits": events.count("/jax/compilation_cache/cache_hits"),
                      "program_hits": events.count("/jax/compilation_cache/cache_hits") - before,
                      "misses": events.count("/jax/compilation_cache/cache_misses")}))
""")


def _run(tmp_path, mode: str, env_dir: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    if env_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = env_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "work"), mode],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_program_with_the_same_hlo_is_a_cache_hit(tmp_path):
    r = _run(tmp_path, "on")
    assert r["path"] == str(tmp_path / "work" / "xla_cache")
    assert r["entries"] >= 1 and r["program_hits"] == 1  # the second was not compiled
    assert r["a"] == r["b"]
    again = _run(tmp_path, "on")  # a rerun with the same work dir compiles nothing
    assert again["misses"] == 0 and again["hits"] == r["hits"] + r["misses"]
    assert again["a"] == r["a"]


def test_off_and_an_environment_cache_are_respected(tmp_path):
    off = _run(tmp_path, "off")
    assert off["path"] is None and off["hits"] == off["misses"] == 0
    assert not (tmp_path / "work" / "xla_cache").exists()
    mine = str(tmp_path / "mine")
    r = _run(tmp_path, "on", env_dir=mine)
    assert r["path"] == mine and r["hits"] >= 1 and os.listdir(mine)
