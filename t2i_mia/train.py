"""``python -m t2i_mia.train``: train a target model on its members and save it.

Two ways to say what the members are:

* ``--members PATH`` (a folder of images with .txt captions, or a JSONL manifest): your own
  member set. The model's public parts (the autoencoder or VQGAN, and the caption
  tokenizer) come from ``--base-dir`` (an existing checkpoint of the same kind, whose image
  size is used) or are trained here on ``--pretrain PATH`` (images disjoint from the
  members, at ``data.image_size``); one of the two is required. ``--out`` then holds the
  model and ``members.json`` (the members' ids and content hashes), ready for
  ``python -m t2i_mia.attack --target-dir OUT --members PATH --nonmembers ...``.
* without it, the data set and split manifest are built as the audit builds them and the
  model is trained on ``target_members`` (+ known members), or ``--member-split
  shadow_members``; ``manifest.json`` is written beside it.

Models are trained (or reused from --work-dir: the same config, members and seed give the
same model) and written in their public checkpoint format: a Stable Diffusion Flax folder
for ``--target ldm``, a DALL-E mini folder (vqgan/, dallebart/, tokenizer/) for
``--target dalle-mini``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys

from t2i_mia import cli
from t2i_mia.data.member_sets import read_member_sets
from t2i_mia.data.sources import open_dataset
from t2i_mia.data.splits import build_splits
from t2i_mia.errors import ConfigError
from t2i_mia.models.ldm import load_stable_diffusion, save_stable_diffusion
from t2i_mia.parallel.mesh import make_mesh
from t2i_mia.targets import dalle_mini as dm
from t2i_mia.targets import factory
from t2i_mia.targets.external import checkpoint_image_size

DESCRIPTION = __doc__.split("\n\n", 1)[1].strip()


def train_model(cfg, work_dir: str, member_split: str = "target_members"):
    """Trains (or reuses from ``work_dir``) the model on a split of the audit's data.

    Returns (components, SplitManifest, number of members)."""
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model)
    cache = factory.ModelCache(work_dir)
    dataset = open_dataset(cfg, sum(vars(cfg.data.splits).values()))
    manifest = build_splits(cfg, dataset)
    name = "target" if member_split == "target_members" else "shadow"
    ids, hashes = factory.model_members(manifest, name)
    if cfg.target == "ldm":
        base = factory.ldm_base(cfg, dataset, manifest, cache, mesh)
        comps = factory.ldm_for(cfg, name, dataset, manifest, base, cache, mesh)
    else:
        pre_images, pre_caps = dataset.get_many(manifest.ids("pretrain"))
        pre_hash = factory.ids_hash(manifest.hashes("pretrain"))
        vqgan = factory.train_or_load_vqgan(cfg, pre_images, pre_hash, cache, mesh)
        tok = factory.train_or_load_dalle_tokenizer(cfg, pre_caps, pre_hash, cache)
        images, caps = dataset.get_many(ids)
        comps = factory.train_or_load_dalle(cfg, name, images, caps, factory.ids_hash(hashes),
                                       vqgan, tok, cache, mesh)
    return comps, manifest, len(ids)


def _dir_hash(folder: str) -> str:
    """SHA-256 over a folder's files (sorted names and bytes)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            h.update(name.encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def train_on_members(cfg, work_dir: str, members: str, base_dir: str | None,
                     pretrain: str | None, fine_tune: bool = False):
    """Trains (or reuses) a model of ``cfg.target`` on the member set at ``members``.

    Public parts from ``base_dir`` or trained on ``pretrain`` (disjoint from the members by
    content); with ``fine_tune`` (ldm, with ``base_dir``) the U-Net and text encoder start
    from the base's. Returns (components, MemberSet of the members)."""
    if fine_tune and not (base_dir and cfg.target == "ldm"):
        raise ConfigError("--fine-tune starts from the --base-dir checkpoint's U-Net and text "
                          "encoder: it needs --base-dir and --target ldm")
    if bool(base_dir) == bool(pretrain):
        raise ConfigError("--members needs the model's public parts from exactly one of "
                          "--base-dir DIR (an existing checkpoint of the same kind) or "
                          "--pretrain PATH (images to train the autoencoder/VQGAN and the "
                          "tokenizer on)")
    size = checkpoint_image_size(cfg.target, base_dir) if base_dir else cfg.data.image_size
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=size))
    roles = {"members": members, "aux": pretrain}  # aux: the pretrain set, checked disjoint
    ms = read_member_sets(roles, size, required=("members",),
                          flags={"members": "--members", "aux": "--pretrain"})
    m = ms.sets["members"]
    images, captions = ms.dataset.get_many(list(m.ids))
    members_hash = factory.ids_hash(list(m.sha256))
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model)
    cache = factory.ModelCache(work_dir)
    if pretrain:
        p = ms.sets["aux"]
        p_images, p_caps = ms.dataset.get_many(list(p.ids))
        p_hash = factory.ids_hash(list(p.sha256))
    if cfg.target == "ldm":
        init = None
        if base_dir:
            base = load_stable_diffusion(base_dir)
            vae, tok = (base.vae_cfg, base.vae_params), base.tokenizer
            if fine_tune:  # the base enters the cache key by its files' content
                init = (factory.cache_key("ldm-from", *(
                    _dir_hash(os.path.join(base_dir, d)) for d in ("unet", "text_encoder"))),
                        base)
        else:
            vae = factory.train_or_load_autoencoder(cfg, p_images, p_hash, cache, mesh)
            tok = factory.train_or_load_tokenizer(cfg, p_caps, p_hash, cache)
        comps = factory.train_or_load_ldm(cfg, "target", images, captions, members_hash, vae,
                                          tok, cache, mesh, init=init)
    else:
        if base_dir:
            base = dm.load_dalle_mini(base_dir)
            # the base's VQGAN enters the DalleBart's cache key by its files' content
            key = factory.cache_key("vqgan-from", _dir_hash(os.path.join(base_dir,
                                                                          dm.VQGAN_DIR)))
            vqgan, tok = (base.vqgan_cfg, base.vqgan_params, key), base.tokenizer
        else:
            vqgan = factory.train_or_load_vqgan(cfg, p_images, p_hash, cache, mesh)
            tok = factory.train_or_load_dalle_tokenizer(cfg, p_caps, p_hash, cache)
        comps = factory.train_or_load_dalle(cfg, "target", images, captions, members_hash, vqgan,
                                       tok, cache, mesh)
    return comps, m


def _save(target: str, comps, folder: str) -> None:
    if target == "ldm":
        save_stable_diffusion(folder, comps)
    else:
        dm.save_dalle_mini(folder, comps)


def main(argv=None) -> int:
    parser = cli.make_parser("python -m t2i_mia.train", DESCRIPTION)
    parser.add_argument("--member-split", default="target_members",
                        choices=("target_members", "shadow_members"),
                        help="which split the model is trained on (default target_members)")
    parser.add_argument("--members", dest="train_members", default=None, metavar="PATH",
                        help="train on your own member set (images + .txt captions, or a "
                             "JSONL manifest); needs --base-dir or --pretrain")
    parser.add_argument("--base-dir", default=None, metavar="DIR",
                        help="with --members: take the autoencoder/VQGAN and tokenizer from "
                             "this checkpoint of the same kind (its image size is used)")
    parser.add_argument("--fine-tune", action="store_true",
                        help="with --members --base-dir (ldm): start the U-Net and text "
                             "encoder from the base checkpoint's and fine-tune them on the "
                             "members, as a Stable Diffusion fine-tune does (default: they "
                             "start from random initialisation)")
    parser.add_argument("--pretrain", default=None, metavar="PATH",
                        help="with --members: train the autoencoder/VQGAN and tokenizer on "
                             "these images (disjoint from the members)")
    args = parser.parse_args(argv)
    cli.setup_logging(args.verbose)
    cfg, paths = cli.resolve(args)
    if cfg.target == "generations":
        raise ConfigError("python -m t2i_mia.train --target generations: a generations folder "
                          "is made elsewhere, not trained (use --target ldm or dalle-mini)")
    if (args.base_dir or args.pretrain) and not args.train_members:
        raise ConfigError("--base-dir and --pretrain go with --members")
    for flag, path in (("--members", args.train_members), ("--base-dir", args.base_dir),
                       ("--pretrain", args.pretrain)):
        if path and not os.path.exists(path):
            raise ConfigError(f"{flag} {path}: no such file or folder")
    what = (f"train a {cfg.target} model on {args.train_members}" if args.train_members
            else f"train a {cfg.target} model on {args.member_split}")
    if args.dry_run:
        print(cli.plan(cfg, paths, what))
        return 0
    cli.use_compile_cache(paths.work_dir, not args.no_compile_cache)
    tmp = paths.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if args.train_members:
        comps, m = train_on_members(cfg, paths.work_dir, args.train_members, args.base_dir,
                                    args.pretrain, args.fine_tune)
        _save(cfg.target, comps, tmp)
        with open(os.path.join(tmp, "members.json"), "w") as f:
            json.dump({"source": os.path.abspath(args.train_members), "ids": list(m.ids),
                       "sha256": list(m.sha256)}, f)
        n, name = len(m), "target"
    else:
        comps, manifest, n = train_model(cfg, paths.work_dir, args.member_split)
        _save(cfg.target, comps, tmp)
        manifest.save(os.path.join(tmp, "manifest.json"))
        name = "target" if args.member_split == "target_members" else "shadow"
    if os.path.exists(paths.out):
        shutil.rmtree(paths.out)
    os.replace(tmp, paths.out)
    print(f"saved {name} model ({n} members) to {paths.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
