"""Helper process for tests/test_checkpoint_resume.py: trains a tiny MLP with run_training.

    python tests/_resume_worker.py --ckpt DIR --out FILE.npz --steps N --every K
                                   [--sigkill-at J] [--sigterm-at J]

``--sigkill-at J`` / ``--sigterm-at J``: when the loop asks for the batch of 0-based step J
(J steps completed), the process sends itself SIGKILL / SIGTERM. Without them it trains to N
steps and writes every leaf of the final state (plus the losses of the steps it ran) to
``--out``. The mesh is 4 x 2 (data x model) when 8 devices are visible (the test's XLA_FLAGS),
with DEFAULT_RULES sharding the kernels over 'model'; else one device.
"""

import argparse
import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from t2i_mia.parallel.mesh import DEFAULT_RULES, make_mesh, path_str  # noqa: E402
from t2i_mia.training.loop import (create_train_state, epoch_batches, jit_train_step,  # noqa: E402
                                   make_train_step, run_training)

N_EXAMPLES, BATCH, DIM = 36, 8, 8  # 36 % 8 != 0: some batches span two epochs


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, rng):
        h = nn.gelu(nn.Dense(16)(x))
        h = nn.Dropout(0.25, deterministic=False)(h, rng=rng)  # uses the step's rng
        return nn.Dense(2)(h)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--every", type=int, required=True)
    ap.add_argument("--sigkill-at", type=int, default=-1)
    ap.add_argument("--sigterm-at", type=int, default=-1)
    args = ap.parse_args(argv)

    data_rng = np.random.default_rng(0)
    x_all = data_rng.standard_normal((N_EXAMPLES, DIM)).astype(np.float32)
    y_all = data_rng.standard_normal((N_EXAMPLES, 2)).astype(np.float32)
    indices = epoch_batches(N_EXAMPLES, BATCH, seed=3)

    def batch_fn(step: int):
        if step == args.sigkill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        idx = indices(step)
        return {"x": x_all[idx], "y": y_all[idx]}

    model = MLP()

    def loss_fn(params, batch, rng):
        pred = model.apply({"params": params}, batch["x"], rng)
        loss = jnp.mean((pred - batch["y"]) ** 2)
        return loss, {"pred_mean": jnp.mean(pred)}

    # numpy init: the same values as any linen init would do, without compiling one
    params = {"Dense_0": {"kernel": data_rng.standard_normal((DIM, 16)).astype(np.float32) / 3,
                          "bias": np.zeros(16, np.float32)},
              "Dense_1": {"kernel": data_rng.standard_normal((16, 2)).astype(np.float32) / 4,
                          "bias": np.zeros(2, np.float32)}}
    tx = optax.adamw(1e-2, weight_decay=1e-3)
    mesh = make_mesh(model=2) if len(jax.devices()) == 8 else make_mesh(devices=jax.devices()[:1])
    state = create_train_state(params, tx, rng=7, ema=True)
    step_fn = jit_train_step(make_train_step(loss_fn, tx, ema_decay=0.9), mesh, state,
                             {"x": x_all[:BATCH], "y": y_all[:BATCH]},
                             rules=DEFAULT_RULES)
    state, history = run_training(state=state, train_step=step_fn, batch_fn=batch_fn,
                                  num_steps=args.steps, mesh=mesh, ckpt_dir=args.ckpt,
                                  checkpoint_every=args.every, desc="resume-test", log_every=2)
    leaves = {path_str(p): np.asarray(jax.device_get(x))
              for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    leaves["__losses__"] = np.array([h["loss"] for h in history], np.float32)
    leaves["__steps__"] = np.array([h["step"] for h in history], np.int64)
    kernel_spec = step_fn.state_shardings.params["Dense_0"]["kernel"].spec
    leaves["__kernel_spec__"] = np.array(repr(kernel_spec))
    np.savez(args.out, **leaves)
    return 0


if __name__ == "__main__":
    sys.exit(main())
