"""Public components: the parts of a text-to-image system that come from public releases.

Real models are built on a public autoencoder and text tokenizer and fine-tuned from a public
base model, and an auditor's image-text encoder is a public model too. A *components folder*
holds such a set, trained by ``python -m t2i_mia.pretrain`` on a public pool of synthetic
scenes drawn from its own random stream (``POOL_SEED``, never an audit's seed) and checked
disjoint by content from every split an audit uses::

    components.json      recipe, file SHA-256s, pool description, held-out measurements
    pool_sha256.bin      the pool's content hashes: sorted raw 32-byte SHA-256 digests
    vae/                 the LDM's autoencoder (diffusers Flax AutoencoderKL folder)
    tokenizer/           the LDM's caption tokenizer (tokenizer.json)
    encoder/             the adversary's CLIP (a Hugging Face Flax CLIP folder)
    base/                optional: a base LDM (a Stable Diffusion Flax folder)

``public.components`` selects a set: ``"package"`` (the set shipped inside the package, see
``PACKAGE_COMPONENTS``) or a folder. :func:`load_components` checks every file against its
SHA-256 before anything is used; the set's digest (:attr:`PublicComponents.digest`) enters
the cache key of every model trained on top of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2i_mia.config import Config
from t2i_mia.data.synthetic import SyntheticCaptions
from t2i_mia.errors import CheckpointError, ConfigError, DataError
from t2i_mia.models import autoencoder_kl, formats
from t2i_mia.models.ldm import LDMComponents, load_stable_diffusion
from t2i_mia.models.tokenizer import TextTokenizer
from t2i_mia.targets.ldm import LDMTarget
from t2i_mia.training.ldm_train import encode_latents

SCHEMA_VERSION = 1
MANIFEST = "components.json"
POOL_HASHES = "pool_sha256.bin"
# The public pool's own stream of the synthetic generator: no audit draws from it unless
# its seed is this number, and the disjointness check refuses that case.
POOL_SEED = 0x7F4A_9C3E_51D2_B867
PACKAGE = "package"
PACKAGE_COMPONENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "assets", "public")
PARTS = ("vae", "tokenizer", "encoder", "base")


def public_pool(image_size: int, n: int) -> SyntheticCaptions:
    """The public pool: ids 0..n-1 of the synthetic generator's ``POOL_SEED`` stream."""
    return SyntheticCaptions(seed=POOL_SEED, size=image_size, n=n)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_files(root: str) -> dict[str, str]:
    """{relative path: SHA-256} of every file under ``root`` but the manifest (sorted)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if rel != MANIFEST:
                out[rel] = file_sha256(path)
    return out


def files_digest(files: dict[str, str]) -> str:
    """The set's identity: SHA-256 of its canonical {file: SHA-256} JSON."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def resolve_folder(spec: str) -> str:
    """``public.components`` -> the folder it names (``package``: the shipped set)."""
    return PACKAGE_COMPONENTS if spec == PACKAGE else os.path.abspath(spec)


@dataclasses.dataclass
class PublicComponents:
    """A verified components folder. ``manifest``: components.json; ``digest``: the files'
    digest; ``pool_hashes``: the pool's content hashes (a set of 32-byte digests)."""
    folder: str
    manifest: dict
    digest: str
    pool_hashes: frozenset

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", os.path.basename(self.folder)))

    def has(self, part: str) -> bool:
        return bool(self.manifest.get("contents", {}).get(part))

    def path(self, part: str) -> str:
        if not self.has(part):
            raise ConfigError(f"{self.folder}: the public components have no '{part}' "
                              f"(contents: {self.manifest.get('contents')})")
        return os.path.join(self.folder, part)

    def vae(self) -> tuple[autoencoder_kl.AutoencoderKLConfig, Any]:
        return autoencoder_kl.load_vae(self.path("vae"))

    def tokenizer(self) -> TextTokenizer:
        return TextTokenizer.from_folder(self.path("tokenizer"))

    def base_ldm(self) -> tuple[str, LDMComponents]:
        """(the key models fine-tuned from it record, the base LDM's components)."""
        return f"public-{self.digest[:16]}", load_stable_diffusion(self.path("base"))

    def info(self) -> dict:
        """What the report records of the set."""
        pool = self.manifest.get("pool", {})
        return {"name": self.name, "folder": self.folder, "sha256": self.digest,
                "contents": [p for p in PARTS if self.has(p)],
                "pool": {"n": pool.get("n"), "sha256": pool.get("sha256")}}

    def check_disjoint(self, manifest, where: str = "the audit's splits") -> None:
        """DataError when any example of the split manifest is in the public pool: the
        public components must never have seen an audited (or attack-training) image."""
        clash = {}
        for name, split in manifest.splits.items():
            n = sum(bytes.fromhex(h) in self.pool_hashes for h in split.sha256)
            if n:
                clash[name] = n
        if clash:
            raise DataError(
                f"{where}: {sum(clash.values())} examples are in the public pool of "
                f"{self.folder} ({', '.join(f'{k}: {v}' for k, v in sorted(clash.items()))}); "
                f"the public components saw them. Use another --seed, other data, or "
                f"public.components=null (train every part on the audit's own splits)")

    def check_config(self, cfg: Config) -> None:
        """ConfigError naming the key when the audit's LDM config does not match the
        components it would use (autoencoder, tokenizer and, when fine-tuning, the base)."""
        vae_cfg = autoencoder_kl.AutoencoderKLConfig.from_dict(cfg.ldm.vae, "config 'ldm.vae'")
        cfg_path = os.path.join(self.path("vae"), autoencoder_kl.CONFIG_NAME)
        got = autoencoder_kl.AutoencoderKLConfig.from_dict(formats.read_json(cfg_path), cfg_path)
        # scaling_factor is measured on the trained autoencoder's latents, not configured
        ours, theirs = vae_cfg.to_dict(), got.to_dict()
        ours.pop("scaling_factor", None), theirs.pop("scaling_factor", None)
        _same(ours, theirs, "ldm.vae", os.path.join(self.folder, "vae"))
        if got.sample_size != cfg.data.image_size:
            raise ConfigError(f"{self.folder}: the public autoencoder is for "
                              f"{got.sample_size}px images but data.image_size is "
                              f"{cfg.data.image_size}")
        tok = self.tokenizer()
        if tok.max_length != cfg.ldm.max_text_length:
            raise ConfigError(f"config key 'ldm.max_text_length' = {cfg.ldm.max_text_length} "
                              f"but the public tokenizer ({self.path('tokenizer')}) makes rows "
                              f"of {tok.max_length}")
        if tok.vocab_size > cfg.ldm.text_encoder.get("vocab_size", tok.vocab_size):
            raise ConfigError(f"config key 'ldm.text_encoder.vocab_size' is below the public "
                              f"tokenizer's {tok.vocab_size} ids")
        if cfg.public.fine_tune and self.has("base"):
            recipe = self.manifest.get("recipe", {}).get("ldm", {})
            for key in ("unet", "text_encoder", "scheduler"):
                if key in recipe:
                    _same(getattr(cfg.ldm, key), recipe[key], f"ldm.{key}",
                          os.path.join(self.folder, "base"))


def _same(ours: dict, theirs: dict, key: str, where: str) -> None:
    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if diff:
        shown = ", ".join(f"{k}: {ours.get(k)!r} vs {theirs.get(k)!r}" for k in diff[:4])
        raise ConfigError(f"config key '{key}' does not match the public components' "
                          f"({where}): {shown}; set public.components=null to train that "
                          f"part on the audit's own data, or use a preset made for them")


def read_pool_hashes(path: str) -> frozenset:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (the public pool's content hashes)")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) % 32:
        raise CheckpointError(f"{path}: {len(data)} bytes, not a whole number of 32-byte "
                              "SHA-256 digests")
    return frozenset(data[i:i + 32] for i in range(0, len(data), 32))


def write_pool_hashes(path: str, hashes: list[str]) -> None:
    blob = b"".join(sorted(bytes.fromhex(h) for h in hashes))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)


def load_components(spec: str) -> PublicComponents:
    """The components folder ``spec`` names (``package`` or a path), every file checked
    against components.json. CheckpointError names a missing, extra or changed file."""
    folder = resolve_folder(spec)
    if not os.path.isdir(folder):
        hint = (" (the package was installed without its public components)" if spec == PACKAGE
                else "; make one with python -m t2i_mia.pretrain --out DIR")
        raise CheckpointError(f"public.components={spec!r}: {folder} is not a folder{hint}")
    manifest = formats.read_json(os.path.join(folder, MANIFEST))
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(f"{os.path.join(folder, MANIFEST)}: schema_version "
                              f"{manifest.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{os.path.join(folder, MANIFEST)}: no 'files' table")
    found = folder_files(folder)
    for rel, sha in sorted(files.items()):
        if rel not in found:
            raise CheckpointError(f"{os.path.join(folder, rel)}: missing (listed in {MANIFEST})")
        if found[rel] != sha:
            raise CheckpointError(f"{os.path.join(folder, rel)}: SHA-256 {found[rel][:12]}... "
                                  f"does not match {MANIFEST}'s {sha[:12]}... (a changed or "
                                  f"corrupt file)")
    extra = sorted(set(found) - set(files))
    if extra:
        raise CheckpointError(f"{folder}: files not in {MANIFEST}: {extra[:5]}")
    pool = read_pool_hashes(os.path.join(folder, POOL_HASHES))
    return PublicComponents(folder, manifest, files_digest(files), pool)


def components_for(cfg: Config) -> PublicComponents | None:
    """The public components an audit of ``cfg`` builds on: ``public.components`` loaded
    and verified, for the synthetic data set only (None otherwise: the components were
    trained on synthetic scenes and are never used on other data or explicit sets)."""
    if not cfg.public.components or cfg.data.source != "synthetic" or cfg.data.sets.explicit:
        return None
    return load_components(cfg.public.components)


def pool_digest(hashes: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


def reconstruct(vae_cfg, vae_params, images: np.ndarray, mesh) -> np.ndarray:
    """uint8[N,H,W,3] -> the autoencoder's reconstructions (posterior mean), uint8."""
    z = encode_latents(vae_cfg, vae_params, images, mesh, scale=1.0)
    model = autoencoder_kl.AutoencoderKL(vae_cfg)
    dec = jax.jit(lambda p, z: jnp.clip(jnp.round((model.apply({"params": p}, z,
                                                               method="decode") + 1) * 127.5),
                                        0, 255).astype(jnp.uint8))
    return np.concatenate([np.asarray(dec(vae_params, z[i:i + 256]))
                           for i in range(0, len(z), 256)])


def base_generations(base: LDMComponents, captions: list[str], sample, seed: int,
                     mesh) -> np.ndarray:
    """One image per caption from the base LDM (``sample``: a DiffusionSampleConfig; image i's
    noise from ``seed`` and i): uint8[N,H,W,3] on the host. The adversary's encoder takes
    them as hard negatives: the named content of a caption without its image's detail."""
    model = LDMTarget(base, sample, seed=seed, mesh=mesh, name="base-negatives")
    return np.asarray(model.generate(list(captions), list(range(len(captions))), 1))[:, 0]


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the PSNR (dB, [0,255] peak) between uint8 images a and b."""
    d = (a.astype(np.float64) - b.astype(np.float64)) / 255.0
    mse = (d * d).reshape(len(a), -1).mean(-1)
    return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))))
