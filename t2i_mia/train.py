"""``python -m t2i_mia.train``: train a target model on its members and save it.

Builds the data set and split manifest as the audit does, trains (or reuses from --work-dir)
the autoencoder on ``pretrain`` and the model on ``target_members`` (+ known members), and
writes it to ``--out`` in its public checkpoint format (a Stable Diffusion Flax folder for
``--target ldm``), with ``manifest.json`` beside it. ``--member-split shadow_members``
trains the shadow model instead.
"""

from __future__ import annotations

import os
import shutil
import sys

from t2i_mia import cli
from t2i_mia.errors import ConfigError

DESCRIPTION = __doc__.split("\n\n", 1)[1].strip()


def train_model(cfg, work_dir: str, member_split: str = "target_members"):
    """Trains (or reuses from ``work_dir``) the LDM on ``member_split``.

    Returns (LDMComponents, SplitManifest, number of members)."""
    from t2i_mia.audit import build_dataset, build_splits
    from t2i_mia.parallel.mesh import make_mesh
    from t2i_mia.targets import factory

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model)
    cache = factory.ModelCache(work_dir)
    dataset = build_dataset(cfg, sum(vars(cfg.data.splits).values()))
    manifest = build_splits(cfg, dataset)
    name = "target" if member_split == "target_members" else "shadow"
    base = factory.ldm_base(cfg, dataset, manifest, cache, mesh)
    comps = factory.ldm_for(cfg, name, dataset, manifest, base, cache, mesh)
    members = (manifest.target_training_ids() if name == "target"
               else manifest.ids("shadow_members"))
    return comps, manifest, len(members)


def main(argv=None) -> int:
    parser = cli.make_parser("python -m t2i_mia.train", DESCRIPTION)
    parser.add_argument("--member-split", default="target_members",
                        choices=("target_members", "shadow_members"),
                        help="which split the model is trained on (default target_members)")
    args = parser.parse_args(argv)
    cli.setup_logging(args.verbose)
    cfg, paths = cli.resolve(args)
    if args.dry_run:
        print(cli.plan(cfg, paths, f"train a {cfg.target} model on {args.member_split}"))
        return 0
    if cfg.target != "ldm":
        raise ConfigError(f"python -m t2i_mia.train --target {cfg.target}: only ldm is "
                          "trained by this entry point (the audit trains dalle-mini targets)")
    comps, manifest, n = train_model(cfg, paths.work_dir, args.member_split)
    from t2i_mia.models.ldm import save_stable_diffusion
    name = "target" if args.member_split == "target_members" else "shadow"
    tmp = paths.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_stable_diffusion(tmp, comps)
    manifest.save(os.path.join(tmp, "manifest.json"))
    if os.path.exists(paths.out):
        shutil.rmtree(paths.out)
    os.replace(tmp, paths.out)
    print(f"saved {name} model ({n} members) to {paths.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
