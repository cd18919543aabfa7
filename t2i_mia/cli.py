"""The flags every entry point shares (docs/design.md: Command line), logging, the plan.

Entry points (``attack``, ``train``, ``generate``) build their parser with
:func:`make_parser`, then call :func:`resolve` to get a validated :class:`Config` and the
run's paths; ``--dry-run`` prints :func:`plan` and touches nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

import jax
from jax.sharding import AbstractMesh

from t2i_mia.config import DATA_SOURCES, PRESETS, TARGETS, Config, load_config
from t2i_mia.data.sources import shard_limit
from t2i_mia.errors import ConfigError, T2IMiaError
from t2i_mia.models import autoencoder_kl
from t2i_mia.models import dallebart as db
from t2i_mia.models import unet as unet_lib
from t2i_mia.models import vqgan as vq
from t2i_mia.models.clip import CLIPConfig, CLIPTextConfig, init_clip, init_clip_text
from t2i_mia.models.configs import check_model_configs
from t2i_mia.parallel.mesh import AXES, config_rules, model_split
from t2i_mia.parallel.distributed import initialize_from_env
from t2i_mia.pipeline.paths import RunPaths

log = logging.getLogger("t2i_mia")

SHARED_EPILOG = """\
configuration:
  --config takes a preset or a JSON file whose keys override the preset named by its
  "preset" key. Presets: ci (64 members vs 128 non-members, the tests' audits, built on the
  shipped public components, the base as calibration reference): 2.6 min cold, measured on
  2 CPU cores (target 54 s, shadow 44: 250 fine-tuning steps each; generation 24, reference
  queries 13, attack 9, white box 8, features 3), about 50 s again on the cached models;
  tiny (the embedded default, 250 vs 250, target and shadow fine-tuned 1000 steps from the
  shipped base, the base as calibration reference): 8.5 min cold on 2 CPU cores (target
  178 s, shadow 175, generation 81, reference queries 43, white box 14, attack 12,
  features 4), a rerun on the
  cached models repeats only the phases after training (about 2.5 min); tiny-scratch (the
  earlier default, 500 vs 500, every part trained on the audit's splits): about 90 min cold
  measured before its reference LDM, which adds about 30 more; paper-ldm / paper-dalle:
  paper scale for accelerators.
  --set key=value (repeatable) overrides
  one value; values are JSON when they parse (3, 0.5, true, [32,64], null), else strings.
  Examples:
    --set adversary.k=8 --set ldm.train.steps=5000
    --set adversary.caption_source=captioner --set adversary.aux_mode=partial
  Unknown keys and wrong types are errors naming the key. --dry-run prints the resolved
  plan (sizes, mesh, steps, outputs) and exits without touching anything.
"""


def make_parser(prog: str, description: str, epilog: str = "",
                explicit_sets: bool = False) -> argparse.ArgumentParser:
    """The shared flags; ``explicit_sets`` adds --members, --nonmembers, --aux,
    --null-target-dir and the shadow flags (the audit's)."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, epilog=(epilog + "\n" + SHARED_EPILOG).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=TARGETS, default=None,
                   help="model kind under audit: ldm (latent diffusion), dalle-mini "
                        "(VQGAN + DalleBart), generations (a folder <id>/<j>.png of images "
                        "made elsewhere). Default: the preset's (ldm).")
    p.add_argument("--target-dir", default=None, metavar="PATH",
                   help="a trained or public checkpoint of the target (Stable Diffusion Flax "
                        "folder for ldm, dalle-mini folder for dalle-mini, the images folder "
                        "for generations). Absent: train one on the embedded default data.")
    p.add_argument("--config", default=None, metavar="PRESET|FILE",
                   help=f"preset ({', '.join(PRESETS)}) or JSON file (default: tiny; with "
                        f"--data coco or cc3m: paper-ldm, or paper-dalle for --target "
                        f"dalle-mini)")
    p.add_argument("--data", choices=DATA_SOURCES, default=None,
                   help="data source: synthetic (embedded, default), folder (images + .txt "
                        "captions, or a JSONL manifest), coco (MS-COCO prepared by "
                        "tensorflow-datasets as array_record; never downloaded here), cc3m "
                        "(webdataset .tar shards in img2dataset layout)")
    p.add_argument("--data-dir", default=None, metavar="PATH",
                   help="--data folder: a folder or manifest.jsonl; coco: the TFDS data dir "
                        "(default $TFDS_DATA_DIR or ~/tensorflow_datasets); cc3m: the .tar "
                        "shards as paths, globs or {00000..00331} patterns, comma-separated")
    p.add_argument("--work-dir", default="t2i_mia_work", metavar="PATH",
                   help="caches: trained models, generations, features (default: "
                        "./t2i_mia_work). A model is reused only when its config, split "
                        "manifest, seed and package version match.")
    p.add_argument("--out", default="t2i_mia_out", metavar="PATH",
                   help="results folder (report.json, report.md, roc.png, samples.png, "
                        "manifest.json); default ./t2i_mia_out")
    p.add_argument("--seed", type=int, default=None, help="root seed (default: config's, 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override one config value (repeatable)")
    if explicit_sets:
        _add_set_flags(p)
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep compiled XLA programs in WORK_DIR/xla_cache (kept by "
                        "default: a program that lowers to the same HLO, as in a rerun on "
                        "the same work dir, is loaded instead of compiled again)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (sizes, mesh, steps, outputs) and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _add_set_flags(p: argparse.ArgumentParser) -> None:
    sets = p.add_argument_group(
        "explicit sets (audit a given checkpoint on the images it was and was not trained "
        "on; each PATH a folder of images with .txt captions or a JSONL manifest)")
    sets.add_argument("--members", default=None, metavar="PATH",
                      help="images the model was trained on (with their captions)")
    sets.add_argument("--nonmembers", default=None, metavar="PATH",
                      help="images it was not trained on, from the same distribution")
    sets.add_argument("--aux", default=None, metavar="PATH",
                      help="the adversary's own images (disjoint from both): its encoder is "
                           "trained on them unless adversary.encoder.dir is set")
    sets.add_argument("--null-target-dir", default=None, metavar="PATH",
                      help="a model of the target's kind that never saw the members (for a "
                           "fine-tune: its base model); absent = no null_target control")
    sets.add_argument("--shadow-dir", default=None, metavar="PATH",
                      help="aux_mode shadow: the user's shadow model, with --shadow-members "
                           "and --shadow-nonmembers")
    sets.add_argument("--shadow-members", default=None, metavar="PATH")
    sets.add_argument("--shadow-nonmembers", default=None, metavar="PATH")


def parse_seeds(text: str | None, seed: int | None) -> list[int] | None:
    """``--seeds 0,1,2`` -> [0, 1, 2] (distinct integers); None without the flag."""
    if text is None:
        return None
    if seed is not None:
        raise ConfigError("--seeds and --seed: give one of them")
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds {text!r}: expected distinct integers >= 0, e.g. 0,1,2")
    return seeds


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S",
        stream=sys.stderr, force=True)
    # absl/orbax are chatty at INFO.
    for name in ("absl", "orbax", "jax._src"):
        logging.getLogger(name).setLevel(logging.WARNING)


def use_compile_cache(work_dir: str, enabled: bool = True, min_compile_s: float = 0.5
                      ) -> str | None:
    """XLA's persistent compilation cache in ``work_dir/xla_cache``; returns the cache folder
    in use (None: off).

    Programs that lower to the same HLO (as a rerun's do, and the same-architecture
    models of one audit can) compile once per work dir instead of once per function
    object. A program is
    keyed by its HLO, the XLA flags and the devices, so a hit runs what a fresh compile
    would. A cache the environment already chose (``JAX_COMPILATION_CACHE_DIR``) is kept.
    Programs that compile in under ``min_compile_s`` are cheaper to recompile than to load.
    Call before the first compile."""
    if not enabled:
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = os.path.join(work_dir, "xla_cache")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_s))
    return path


def default_preset(data: str | None, target: str | None) -> str:
    """The preset used without --config: tiny, or paper scale for the real data sets."""
    if data in ("coco", "cc3m"):
        return "paper-dalle" if target == "dalle-mini" else "paper-ldm"
    return "tiny"


def resolve(args: argparse.Namespace) -> tuple[Config, RunPaths]:
    """Flags -> validated config and paths. Flags win over the config file, --set over both."""
    overrides = list(args.overrides)
    if args.target:
        overrides.insert(0, f"target={json.dumps(args.target)}")
    if args.data:
        overrides.insert(0, f"data.source={json.dumps(args.data)}")
    if args.data_dir:
        overrides.insert(0, f"data.data_dir={json.dumps(args.data_dir)}")
    if args.seed is not None:
        overrides.insert(0, f"seed={args.seed}")
    given = {role: getattr(args, role, None) for role in
             ("members", "nonmembers", "aux", "shadow_members", "shadow_nonmembers")}
    for role, path in given.items():
        if path:
            overrides.insert(0, f"data.sets.{role}={json.dumps(os.path.abspath(path))}")
    if (given["members"] or given["nonmembers"]) and not _aux_mode_given(args):
        # explicit sets: a shadow when one is given, else the known fraction of the sets
        mode = "shadow" if getattr(args, "shadow_dir", None) else "partial"
        overrides.insert(0, f"adversary.aux_mode={mode}")
    cfg = check_model_configs(
        load_config(args.config or default_preset(args.data, args.target), overrides))
    sets = cfg.data.sets
    for flag, path in (("--shadow-dir", getattr(args, "shadow_dir", None)),
                       ("--null-target-dir", getattr(args, "null_target_dir", None))):
        if path and not sets.explicit:
            raise ConfigError(f"{flag} goes with --members and --nonmembers (explicit sets)")
        if path and not args.dry_run and not os.path.exists(path):
            raise ConfigError(f"{flag} {path}: no such folder")
    if sets.explicit:
        if not args.target_dir:
            raise ConfigError("--members/--nonmembers audit a given model: give its checkpoint "
                              "with --target-dir")
        if cfg.adversary.aux_mode == "shadow" and not getattr(args, "shadow_dir", None):
            raise ConfigError("adversary.aux_mode=shadow with explicit sets needs --shadow-dir "
                              "(the shadow model) with --shadow-members/--shadow-nonmembers")
        if not cfg.adversary.encoder.dir and not sets.aux:
            raise ConfigError("explicit sets need the adversary's encoder: set "
                              "adversary.encoder.dir (a local HF CLIP folder) or give --aux "
                              "PATH (the adversary's own images, to train one on); the "
                              "synthetic default's components are never used on your data")
        if cfg.adversary.caption_source == "captioner" and not sets.aux:
            raise ConfigError("adversary.caption_source=captioner draws captions from --aux: "
                              "give --aux PATH")
        for role, path in given.items():
            if path and not args.dry_run and not os.path.exists(path):
                raise ConfigError(f"--{role.replace('_', '-')} {path}: no such file or folder")
    if args.target_dir is not None and not args.dry_run and not os.path.exists(args.target_dir):
        raise ConfigError(f"--target-dir {args.target_dir}: no such file or folder")
    if cfg.data.source == "folder" and not cfg.data.data_dir:
        raise ConfigError("--data folder needs --data-dir (a folder of images + .txt captions, "
                          "or a manifest.jsonl)")
    if cfg.data.source == "cc3m" and not cfg.data.data_dir and not args.dry_run:
        raise ConfigError("--data cc3m needs --data-dir: the webdataset .tar shards (paths, "
                          "globs or {00000..00331} patterns, comma-separated)")
    if cfg.target == "generations" and not args.target_dir:
        raise ConfigError("--target generations needs --target-dir: a folder <id>/<j>.png")
    shadow_dir, null_dir = getattr(args, "shadow_dir", None), getattr(args, "null_target_dir",
                                                                       None)
    paths = RunPaths(work_dir=os.path.abspath(args.work_dir), out=os.path.abspath(args.out),
                     target_dir=args.target_dir and os.path.abspath(args.target_dir),
                     data_dir=cfg.data.data_dir,
                     shadow_dir=shadow_dir and os.path.abspath(shadow_dir),
                     null_target_dir=null_dir and os.path.abspath(null_dir))
    return cfg, paths


def _aux_mode_given(args) -> bool:
    """Whether ``adversary.aux_mode`` was set by --set or by a --config JSON file."""
    if any(o.split("=", 1)[0].strip() == "adversary.aux_mode" for o in args.overrides):
        return True
    spec = args.config
    if spec and os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return False  # load_config reports it
        adv = data.get("adversary") if isinstance(data, dict) else None
        return isinstance(data, dict) and ("adversary.aux_mode" in data or (
            isinstance(adv, dict) and "aux_mode" in adv))
    return False


def plan(cfg: Config, paths: RunPaths, what: str) -> str:
    """A readable plan of what a run would do."""
    s = cfg.data.splits
    n_dev = len(jax.devices())
    data_ax = n_dev // cfg.mesh.model if cfg.mesh.data == -1 else cfg.mesh.data
    lines = [
        f"t2i-mia plan: {what}",
        f"  preset        {cfg.preset}   seed {cfg.seed}   target {cfg.target}"
        + (f" (from {paths.target_dir})" if paths.target_dir else " (trained here)"),
        "  data          explicit sets (below), at the checkpoint's image size"
        if cfg.data.sets.explicit else
        f"  data          {_data_location(cfg)}, {cfg.data.image_size}x{cfg.data.image_size}",
        "  splits        " + ("members / non-members as given" if cfg.data.sets.explicit else
                              ", ".join(f"{f.name}={getattr(s, f.name)}"
                                        for f in dataclasses.fields(s))),
        f"  mesh          data={data_ax} x model={cfg.mesh.model} over {n_dev} "
        f"{jax.default_backend()} device(s)",
    ]
    lines += sharding_lines(cfg, max(1, data_ax), paths)
    if cfg.data.sets.explicit:
        lines.append("  models        given: nothing of the target's kind is trained")
    elif cfg.target == "ldm":
        l = cfg.ldm
        pub = cfg.public.components
        lines += [
            f"  autoencoder   public components {pub} (with the caption tokenizer)" if pub else
            f"  autoencoder   {l.vae_train.steps} steps x batch {l.vae_train.batch_size} "
            f"on pretrain",
        ]
        if pub and cfg.public.fine_tune:
            lines.append(f"  base ldm      public components {pub} (when the set has one); "
                         f"every LDM below fine-tunes from it")
        elif l.base_train.steps and not pub:
            lines.append(f"  base ldm      {l.base_train.steps} steps x batch "
                         f"{l.base_train.batch_size} on pretrain; every LDM below "
                         f"fine-tunes from it")
        lines += [
            f"  ldm training  {l.train.steps} steps x batch {l.train.batch_size} per model "
            f"(target{', shadow' if cfg.adversary.aux_mode == 'shadow' else ', null'})",
            f"  sampling      DDIM {l.sample.num_inference_steps} steps, guidance "
            f"{l.sample.guidance_scale}, eta {l.sample.eta}",
        ]
    elif cfg.target == "dalle-mini":
        d = cfg.dalle
        lines += [
            f"  vqgan         {d.vqgan_train.steps} steps on pretrain",
            f"  dallebart     {d.train.steps} steps x batch {d.train.batch_size} per model",
            f"  sampling      {d.bart.get('image_length', '?')} tokens, condition scale "
            f"{d.sample.condition_scale}, top-k {d.sample.top_k or 'off'}",
        ]
    a = cfg.adversary
    sets = cfg.data.sets
    if sets.explicit:
        lines += [f"  query sets    {role} {getattr(sets, role)}" for role in
                  ("members", "nonmembers", "shadow_members", "shadow_nonmembers", "aux")
                  if getattr(sets, role)]
        lines += [f"  known part    {a.known_fraction:.0%} of each set trains the attacks "
                  f"(aux_mode partial)" if a.aux_mode == "partial" else
                  f"  known part    none (aux_mode {a.aux_mode})",
                  f"  null target   {paths.null_target_dir or 'none (the control is absent)'}"]
    lines += [
        f"  adversary     k={a.k}, captions={a.caption_source}, aux={a.aux_mode}, encoder="
        + (a.encoder.dir or (f"public components {cfg.public.components}"
                             if cfg.public.components else
                             f"CLIP trained {a.encoder.train.steps} steps on auxiliary")),
        "  calibrated    off (explicit sets: no reference models)" if sets.explicit else
        _calibration_plan(cfg),
        ("  evaluation    the given sets' evaluated part; " if sets.explicit else
         f"  evaluation    {s.target_members} members vs {s.target_nonmembers} non-members; ")
        + f"controls null_target (Holm alarm), shuffled_labels ({a.n_shuffles} shuffles); "
        f"{a.n_bootstrap} bootstrap resamples",
        f"  work dir      {paths.work_dir}",
        f"  outputs       {paths.out}/report.json, report.md, roc.png, samples.png, "
        "manifest.json",
    ]
    return "\n".join(lines)


def _calibration_plan(cfg: Config) -> str:
    a = cfg.adversary
    refs = [f"{a.n_reference} reference model(s) trained on draws from auxiliary"] \
        if a.n_reference else []
    if a.base_reference and cfg.target == "ldm":
        refs.append("the base LDM (never saw a query)")
    if not refs:
        return "  calibrated    off (adversary.n_reference=0, adversary.base_reference=false)"
    return "  calibrated    " + " + ".join(refs)


def _planned_models(cfg: Config, paths: RunPaths) -> dict:
    """Parameter shapes (ShapeDtypeStructs, no compute) of the models this run would train
    or sample with, by name."""
    key = jax.random.key(0)
    shapes = {}
    if not (cfg.data.sets.explicit or paths.target_dir):
        if cfg.target == "ldm":
            shapes["autoencoder"] = autoencoder_kl.param_shapes(
                autoencoder_kl.AutoencoderKLConfig.from_dict(cfg.ldm.vae))
            shapes["unet"] = unet_lib.param_shapes(
                unet_lib.UNet2DConditionConfig.from_dict(cfg.ldm.unet))
            text_cfg = CLIPTextConfig.from_dict(cfg.ldm.text_encoder)
            shapes["text encoder"] = jax.eval_shape(lambda k: init_clip_text(text_cfg, k), key)
        elif cfg.target == "dalle-mini":
            vq_cfg = vq.VQGANConfig.from_dict(cfg.dalle.vqgan)
            size = cfg.data.image_size
            shapes["vqgan"] = jax.eval_shape(lambda k: vq.init_vqgan(vq_cfg, k, size), key)
            bart = db.DalleBartConfig.from_dict(cfg.dalle.bart)
            shapes["dallebart"] = jax.eval_shape(lambda k: db.init_dallebart(bart, k), key)
    if not cfg.adversary.encoder.dir:
        clip_cfg = CLIPConfig.from_dict(cfg.adversary.encoder.clip)
        shapes["clip encoder"] = jax.eval_shape(lambda k: init_clip(clip_cfg, k), key)
    return shapes


def sharding_lines(cfg: Config, data_axis: int, paths: RunPaths) -> list[str]:
    """One line per model: ``<model>: sharded over model: N of M parameters`` on the planned
    mesh (``mesh.data`` x ``mesh.model``) under ``mesh.rules``."""
    mesh = AbstractMesh((data_axis, cfg.mesh.model), AXES)
    rules = config_rules(cfg)
    out = []
    for name, shapes in _planned_models(cfg, paths).items():
        n, total = model_split(shapes, mesh, rules)
        # float32 parameters; Adam keeps two moments of each
        per_dev = 4 * (total - n + n / cfg.mesh.model) / 2 ** 20
        out.append(f"  {name}: sharded over model: {n:,} of {total:,} parameters "
                   f"(per device: {per_dev:.1f} MiB of parameters + {2 * per_dev:.1f} MiB of "
                   f"Adam moments)")
    return out


def _data_location(cfg: Config) -> str:
    d = cfg.data
    if d.source == "coco":
        where = d.data_dir or "$TFDS_DATA_DIR or ~/tensorflow_datasets"
        return (f"coco: TFDS {d.tfds_name} split {d.tfds_split} from {where} (array_record; "
                f"read, never downloaded)")
    if d.source == "cc3m":
        n = sum(getattr(d.splits, f.name) for f in dataclasses.fields(d.splits))
        shards = d.data_dir or "none given (--data-dir is needed for a real run)"
        return (f"cc3m: webdataset shards {shards}, indexed up to {shard_limit(n)} good "
                f"samples (bad ones counted and skipped)")
    return d.source + (f" ({d.data_dir})" if d.data_dir else "")


def run_main(fn, argv=None) -> int:
    """Runs an entry point, turning our errors into one clear line and exit code 2."""
    try:
        # jax.distributed from T2I_MIA_* / a multi-worker TPU slice; a no-op on one host
        initialize_from_env()
        return fn(argv) or 0
    except T2IMiaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
