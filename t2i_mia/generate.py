"""``python -m t2i_mia.generate``: k images per caption from a target, as ``<id>/<j>.png``.

The output folder is exactly what ``--target generations`` audits, so images made here (or
by any other tool in the same layout) can be audited later. Captions come from
``--captions FILE`` (JSONL lines ``{"id": int, "caption": str}``) or, by default, from the
evaluation split (target_members + target_nonmembers) of the configured data. The target is
``--target-dir`` (``--target ldm``: a Stable Diffusion folder, Flax or PyTorch layout;
``--target dalle-mini``: a DALL-E mini folder) or the model ``python -m t2i_mia.train``
would train (reused from --work-dir).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from t2i_mia import cli
from t2i_mia.data.images import save_png
from t2i_mia.data.sources import open_dataset
from t2i_mia.data.splits import build_splits
from t2i_mia.errors import ConfigError, DataError
from t2i_mia.models.precision import policy_of
from t2i_mia.parallel.mesh import config_rules, make_mesh
from t2i_mia.targets.dalle_mini import DalleMiniTarget
from t2i_mia.targets.external import checkpoint_image_size, load_model
from t2i_mia.targets.ldm import LDMTarget
from t2i_mia.train import train_model

DESCRIPTION = __doc__.split("\n\n", 1)[1].strip()


def read_captions(path: str) -> tuple[list[int], list[str]]:
    ids, caps = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not valid UTF-8 ({e})") from e
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e})") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), int) \
                    or not isinstance(obj.get("caption"), str) or not obj["caption"].strip():
                raise DataError(f'{path}:{n}: expected {{"id": int, "caption": non-empty str}}')
            ids.append(obj["id"])
            caps.append(obj["caption"])
    if not ids:
        raise DataError(f"{path}: no captions")
    return ids, caps


def main(argv=None) -> int:
    parser = cli.make_parser("python -m t2i_mia.generate", DESCRIPTION)
    parser.add_argument("--captions", default=None, metavar="FILE",
                        help='JSONL of {"id": int, "caption": str} (default: evaluation split)')
    parser.add_argument("-k", type=int, default=None, help="images per caption "
                        "(default: adversary.k)")
    args = parser.parse_args(argv)
    cli.setup_logging(args.verbose)
    cfg, paths = cli.resolve(args)
    k = args.k or cfg.adversary.k
    if args.dry_run:
        print(cli.plan(cfg, paths, f"generate {k} images per caption into {paths.out}"))
        return 0
    cli.use_compile_cache(paths.work_dir, not args.no_compile_cache)
    if cfg.target == "generations":
        raise ConfigError("python -m t2i_mia.generate --target generations: a generations "
                          "folder is already images (use --target ldm or dalle-mini)")
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model)
    if paths.target_dir:
        size = checkpoint_image_size(cfg.target, paths.target_dir)
        target = load_model(cfg.target, paths.target_dir, cfg, size, cfg.seed, mesh, "target")
    else:
        comps, _, _ = train_model(cfg, paths.work_dir)
        if cfg.target == "ldm":
            target = LDMTarget(comps, cfg.ldm.sample, seed=cfg.seed, mesh=mesh,
                               rules=config_rules(cfg), policy=policy_of(cfg))
        else:
            target = DalleMiniTarget.from_components(comps, cfg.dalle.sample, seed=cfg.seed,
                                                     mesh=mesh, rules=config_rules(cfg),
                                                     policy=policy_of(cfg))
    if args.captions:
        ids, captions = read_captions(args.captions)
    else:
        dataset = open_dataset(cfg, sum(vars(cfg.data.splits).values()))
        manifest = build_splits(cfg, dataset)
        ids = manifest.ids("target_members") + manifest.ids("target_nonmembers")
        captions = dataset.captions(ids)
    images = np.asarray(target.generate(captions, ids, k))
    for i, per in zip(ids, images):
        os.makedirs(os.path.join(paths.out, str(i)), exist_ok=True)
        for j in range(k):
            save_png(os.path.join(paths.out, str(i), f"{j}.png"), per[j])
    with open(os.path.join(paths.out, "captions.jsonl"), "w", encoding="utf-8") as f:
        for i, c in zip(ids, captions):
            f.write(json.dumps({"id": int(i), "caption": c}) + "\n")
    print(f"wrote {len(ids)} x {k} images to {paths.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
