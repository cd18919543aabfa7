"""One config system for the whole package: typed dataclasses, presets, overrides, validation.

A config is data. ``get_config(preset)`` returns a preset (``ci``, ``tiny``, ``paper-ldm``,
``paper-dalle``); ``load_config(spec, overrides)`` takes ``PRESET`` or a JSON ``FILE`` (whose
keys override the preset named by its ``"preset"`` key, default ``tiny``) and ``--set
key=value`` overrides, then validates everything. Unknown keys and wrong types are errors
that name the key.

Model sub-configs (``ldm.unet``, ``ldm.vae``, ``dalle.bart`` ...) are dicts whose keys are
those of the public checkpoint's ``config.json``, so a checkpoint config loads as is; they
are validated by the model's own config class at load time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from t2i_mia.errors import ConfigError

TARGETS = ("ldm", "dalle-mini", "generations")
DATA_SOURCES = ("synthetic", "folder", "coco", "cc3m")
CAPTION_SOURCES = ("ground_truth", "captioner")
AUX_MODES = ("shadow", "partial", "none")
MLP_EMBEDDINGS = ("auto", "always", "never")
SSL_VIEWS = ("augment", "autoencoder")
HARD_NEGATIVES = ("none", "base")
AUGMENTATIONS = ("mild", "coarse")  # t2i_mia.training.clip_train.AUGMENTATIONS


# Sharding rules, as data (big_vision style): ``[regex, axis of dim 0, axis of dim 1, ...]``,
# null keeping that dimension whole. A parameter (and with it its optimiser moments and EMA)
# takes the first rule whose regex matches its ``/``-joined path and whose axis count is its
# rank; a parameter no rule matches is replicated. The defaults split the output features of
# every Dense kernel (in, out) and conv kernel (h, w, in, out) over ``model``.
DEFAULT_SHARDING_RULES: tuple[tuple[str | None, ...], ...] = (
    (r"(^|/)kernel$", None, "model"),
    (r"(^|/)kernel$", None, None, None, "model"),
)


@dataclass
class MeshConfig:
    """Device mesh: axes ``data`` x ``model``; -1 = all remaining devices. ``rules`` say
    which parameter dimensions the ``model`` axis splits (see DEFAULT_SHARDING_RULES); they
    apply to every model's training state and to its parameters for generation."""
    data: int = -1
    model: int = 1
    rules: tuple[tuple[str | None, ...], ...] = DEFAULT_SHARDING_RULES


PRECISIONS = ("float32", "bfloat16", "float16")


@dataclass
class PrecisionConfig:
    """Precision policy of every model (t2i_mia.models.precision): ``dtype`` for the matmuls
    and convolutions, ``param_dtype`` for the stored parameters. ``bfloat16`` compute with
    ``float32`` parameters is the accelerator setting; norms, softmax and losses stay
    float32 whatever is chosen."""
    dtype: str = "float32"
    param_dtype: str = "float32"


@dataclass
class SplitsConfig:
    """Number of examples per split of the manifest (docs/design.md: Data and splits)."""
    pretrain: int = 2000
    target_members: int = 500
    target_nonmembers: int = 500
    target_known_members: int = 0
    target_known_nonmembers: int = 0
    shadow_members: int = 500
    shadow_nonmembers: int = 500
    auxiliary: int = 1000


@dataclass
class MemberSetsConfig:
    """Explicit sets (``--members`` etc.; :mod:`t2i_mia.data.member_sets`): each a folder of
    images with ``.txt`` captions or a JSONL manifest. With ``members`` and ``nonmembers``
    the audit evaluates these sets on a given checkpoint instead of drawing splits."""
    members: str | None = None
    nonmembers: str | None = None
    shadow_members: str | None = None
    shadow_nonmembers: str | None = None
    aux: str | None = None

    @property
    def explicit(self) -> bool:
        return bool(self.members or self.nonmembers)


@dataclass
class DataConfig:
    """``data_dir``: folder/manifest (folder), TFDS data dir (coco; None = TFDS's default),
    comma-separated ``.tar`` shard paths/globs/brace patterns (cc3m). ``tfds_name`` /
    ``tfds_split``: the TFDS dataset and split read for coco (see ``data.coco``)."""
    source: str = "synthetic"
    data_dir: str | None = None
    image_size: int = 32
    tfds_name: str = "coco_captions"
    tfds_split: str = "train+restval+val+test"
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    sets: MemberSetsConfig = field(default_factory=MemberSetsConfig)


@dataclass
class TrainConfig:
    """One training run: optax adamw with linear warm-up and cosine decay."""
    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 disables EMA
    checkpoint_every: int = 500


@dataclass
class DiffusionSampleConfig:
    num_inference_steps: int = 10
    guidance_scale: float = 3.0
    eta: float = 0.0
    batch_size: int = 128


@dataclass
class LDMConfig:
    """Latent diffusion target. ``vae``/``unet``/``text_encoder``/``scheduler`` use diffusers /
    Hugging Face config.json keys."""
    vae: dict = field(default_factory=dict)
    unet: dict = field(default_factory=dict)
    text_encoder: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    vocab_size: int = 512
    max_text_length: int = 24
    caption_dropout: float = 0.1
    # Training timesteps t = floor(T * u**(1/p)), u ~ U[0,1): 1 is uniform (DDPM); p > 1 puts
    # more of the training on high noise, where the sampler decides an image's content.
    timestep_power: float = 1.0
    vae_kl_weight: float = 1e-6
    vae_train: TrainConfig = field(default_factory=TrainConfig)
    # A public base LDM trained on the ``pretrain`` split (disjoint from every evaluated
    # split) that every LDM of the audit (target, shadow, references) fine-tunes from with
    # ``train``, as real models are fine-tuned from a public base. steps 0: no base, every
    # LDM trains from random initialisation.
    base_train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=0))
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: DiffusionSampleConfig = field(default_factory=DiffusionSampleConfig)


@dataclass
class DalleSampleConfig:
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    temperature: float = 1.0
    condition_scale: float = 3.0
    batch_size: int = 128


@dataclass
class DalleConfig:
    """DALL-E mini target. ``vqgan``/``bart`` use vqgan-jax / dalle-mini config.json keys."""
    vqgan: dict = field(default_factory=dict)
    bart: dict = field(default_factory=dict)
    vocab_size: int = 512
    caption_dropout: float = 0.1  # empty caption rate in training (for super-conditioning)
    vqgan_train: TrainConfig = field(default_factory=TrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: DalleSampleConfig = field(default_factory=DalleSampleConfig)


@dataclass
class EncoderConfig:
    """The adversary's CLIP two-tower encoder (HF CLIP config keys in ``clip``)."""
    dir: str | None = None  # a local HF Flax CLIP checkpoint; None = train on `auxiliary`
    clip: dict = field(default_factory=dict)
    vocab_size: int = 512
    max_text_length: int = 24
    # Weight of the SLIP-style image-image contrastive term (0 = plain CLIP training); see
    # t2i_mia.training.clip_train.
    image_ssl_weight: float = 0.0
    # The image-image term's second view: "augment" (the image again) or "autoencoder" (its
    # reconstruction through the public autoencoder: generations are decoded images, and an
    # encoder trained on sharp images alone matched a held-out image's reconstruction to it
    # in 28% of cases among 256). "autoencoder" needs the public components' autoencoder
    # (python -m t2i_mia.pretrain, or an audit with public.components).
    ssl_views: str = "augment"
    # The image-image term's hard negatives: "none", or "base": each training image's
    # generation by the public base LDM from the image's own caption (the same named content
    # without the image's detail, as a non-member's generations are), with a pair term of
    # weight hard_negative_weight asking that the image's view be closer to it than its
    # negative. On seed 0's tiny audit (1000 encoder steps) the semantic attack's
    # cosine.max read 0.669 without, 0.710 with the negatives alone and 0.737 with the pair
    # term. "base" needs the public components' base LDM.
    hard_negatives: str = "none"
    hard_negative_weight: float = 1.0
    # The image-image term's augmentation: "mild" (a shift of up to 2 pixels, blur, noise)
    # or "coarse" (mild, after a random downsample to 1/8, 1/4 or 1/2 of the side for 3 in
    # 4 views): the embedding then matches images by layout and colours, what a partly
    # memorised generation keeps. Seed 0, 1000 steps: cosine.max 0.669 mild, 0.724 coarse.
    augmentation: str = "mild"
    # CLIP's recipe: weight decay 0.1 on matrices, no gradient clipping
    train: TrainConfig = field(default_factory=lambda: TrainConfig(weight_decay=0.1,
                                                                   grad_clip=0.0))


@dataclass
class MLPConfig:
    hidden: tuple[int, ...] = (64, 64)
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    max_epochs: int = 300
    patience: int = 30
    val_fraction: float = 0.2
    # Vector features (the embeddings) as MLP inputs: "auto" fits the MLP with and without
    # them and keeps the lower validation loss (on attack-training data only); "always" or
    # "never" force the choice. Hundreds of embedding inputs over ~10^3 attack-training rows
    # can drown the few informative scalar features.
    embeddings: str = "auto"


@dataclass
class AdversaryConfig:
    caption_source: str = "ground_truth"
    k: int = 4
    # attack-training data: shadow (a shadow model's members vs non-members), partial (a
    # known fraction of the target's own sets), none (no attack training: each scalar
    # feature is a score with the sign the intuitions fix)
    aux_mode: str = "shadow"
    # partial mode with explicit sets: the stratified fraction of each set that is the
    # adversary's labelled knowledge (the rest is evaluated)
    known_fraction: float = 0.2
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    n_bootstrap: int = 1000
    # shuffled_labels control: MLPs fitted to this many independent label shuffles; its CI
    # is that of their mean AUC, so more shuffles make the control more sensitive to a leak
    n_shuffles: int = 50
    # reference models for the calibrated attack: LDMs (or DalleBarts) of the target's kind
    # trained on seeded draws from the auxiliary split, never on a queried image (0 = none)
    n_reference: int = 1
    # the base LDM the audit's LDMs were fine-tuned from (public components or
    # ldm.base_train) as one more calibration reference: it never saw a queried image (its
    # pool / pretrain split is checked disjoint from every evaluated one), and it costs no
    # training. Used only when there is a base (ldm target); otherwise ignored with a warning.
    base_reference: bool = False
    white_box: bool = True  # the labelled upper-bound reference (outside the threat model)
    # side of the downsamples compared by pixel.coarse_mse (0 = leave that feature out)
    pixel_coarse_side: int = 8


@dataclass
class PublicConfig:
    """Public components (:mod:`t2i_mia.targets.public`, made by ``python -m
    t2i_mia.pretrain``): the autoencoder, caption tokenizer, base LDM and adversary's encoder
    that real systems take from public releases, trained on a public pool of ``pool``
    synthetic scenes from the generator's own stream (never an audit's seed) and checked
    disjoint from every split. ``components``: null (every part trained on the audit's own
    ``pretrain`` / ``auxiliary`` splits), ``package`` (the set shipped in the package) or a
    folder. ``fine_tune``: the audit's LDMs (target, shadow, references) start from the
    components' base LDM when the set has one. ``heldout``: pool images kept out of
    training, on which ``pretrain`` measures the autoencoder's PSNR and the encoder's
    caption-to-image retrieval."""
    components: str | None = None
    fine_tune: bool = True
    pool: int = 8000
    heldout: int = 512


@dataclass
class Config:
    preset: str = "tiny"
    seed: int = 0
    target: str = "ldm"
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    ldm: LDMConfig = field(default_factory=LDMConfig)
    dalle: DalleConfig = field(default_factory=DalleConfig)
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    public: PublicConfig = field(default_factory=PublicConfig)

    def to_dict(self) -> dict:
        return _to_jsonable(dataclasses.asdict(self))

    def section_hash(self, *keys: str) -> str:
        """SHA-256 of the canonical JSON of the named sections (for cache keys)."""
        d = self.to_dict()
        sub = {k: _get_path(d, k) for k in keys}
        return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- presets

# The shipped autoencoder's latent channels (32x32 -> 8x8xC). On the public pool, after 2400
# steps, 8 channels keep 62% of the named objects through a reconstruction (PSNR 27.3 dB)
# where 4 keep 49% (25.5 dB; 39% after 600 steps), at the same step time (bench/README.md).
PUBLIC_LATENT_CHANNELS = 8


def _ci_tiny_ldm(size: str, latent_channels: int = 4) -> LDMConfig:
    """The LDM of the small presets. ``latent_channels``: 8 for the shapes of the shipped
    public components (``ci``, ``tiny``), 4 for ``tiny-scratch``."""
    small = size == "ci"
    return LDMConfig(
        vae={
            "in_channels": 3, "out_channels": 3, "latent_channels": latent_channels,
            "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3,
            "block_out_channels": [16, 32, 32],
            "layers_per_block": 1, "act_fn": "silu", "norm_num_groups": 8,
            "sample_size": 32, "scaling_factor": 1.0,
        },
        unet={
            "sample_size": 8, "in_channels": latent_channels, "out_channels": latent_channels,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            # [64, 128] memorises several times better than [32, 64] at ~1.4x the step time
            # (ci, 128 members, 1000 steps: pixel MSE AUC 0.93 vs 0.83)
            "block_out_channels": [64, 128],
            "layers_per_block": 1, "attention_head_dim": 8, "cross_attention_dim": 64,
            "flip_sin_to_cos": True, "freq_shift": 0, "use_linear_projection": False,
        },
        text_encoder={
            "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 24,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 64,
        },
        scheduler={
            "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            # x0 ("sample") prediction: at high noise the denoiser must produce the image
            # from the caption alone, which is where a small model memorises its members
            # fastest (epsilon prediction needed several times the steps here).
            "beta_schedule": "scaled_linear", "prediction_type": "sample",
            "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
            "timestep_spacing": "leading",
        },
        vocab_size=512, max_text_length=24, caption_dropout=0.1,
        # The autoencoder bounds what any attack can see: after 100 steps its reconstructions
        # lost the objects (MSE 0.019 on [0,1] pixels) and the LDM's pixel AUC was 0.62;
        # after 600 steps (MSE 0.007) the same LDM reached 0.83.
        vae_train=TrainConfig(steps=600, batch_size=32,
                              learning_rate=2e-3, warmup_steps=20, checkpoint_every=200),
        # tiny-scratch: 6000 steps = 384 epochs of 500 members. Memorisation sets in late and
        # steeply: white-box AUC 0.57 / 0.76 / 0.998 and pixel MSE AUC 0.52 / 0.70 / 0.91
        # after 1000 / 3000 / 6000 steps (wider U-Nets, other learning rates and batch
        # sizes did worse at equal samples).
        # ci: 250 steps (125 epochs of 64 members) fine-tuned from the shipped base LDM
        # (public.components): at ci, 250 fine-tuning steps gave pixel AUC 0.89 and
        # white-box 0.96 where 250 steps from scratch gave 0.65 and 0.77 (bench/fine_tune.py).
        train=TrainConfig(steps=250 if small else 6000, batch_size=32, learning_rate=3e-3,
                          warmup_steps=50, checkpoint_every=250 if small else 1000),
        sample=DiffusionSampleConfig(num_inference_steps=10, guidance_scale=3.0, eta=0.0,
                                     batch_size=64 if small else 128),
    )


def _ci_tiny_dalle(size: str) -> DalleConfig:
    """ci: f8 VQGAN (16 tokens), small DalleBart, fast. tiny: f4 VQGAN (64 tokens of 4x4
    pixels; f8 reconstructions lose the objects at 32x32) and a DalleBart that memorises 500
    members: measured on the synthetic data (2 shared CPU cores), 800 steps reach a training
    loss of 0.04 and pixel MSE(min over k=4) separates members from non-members with
    AUC 0.87 (0.82 at condition_scale 2; 600 steps: loss 0.1, AUC 0.58). Stronger
    super-conditioning hurts a model this small: guidance extrapolates away from the
    memorised tokens (1200 steps: AUC 0.98 at scale 1, 0.97 at 2, 0.75 at 3)."""
    small = size == "ci"
    grid = 4 if small else 8  # 16 or 64 image tokens at 32x32
    n_res = 4 if small else 3  # f8 or f4 downsampling
    return DalleConfig(
        vqgan={
            # ch 32 is the least GroupNorm(32) allows; low-dimensional codes (embed_dim 8)
            # and dead-code restarts keep the whole codebook in use
            "ch": 32, "out_ch": 3, "in_channels": 3, "num_res_blocks": 1,
            "attn_resolutions": [], "ch_mult": [1] * n_res, "resolution": 32,
            "z_channels": 32, "double_z": False, "n_embed": 256, "embed_dim": 8,
            "dropout": 0.0, "resamp_with_conv": True, "give_pre_end": False,
            "num_resolutions": n_res,
        },
        bart={
            "d_model": 64 if small else 128, "encoder_layers": 2, "decoder_layers": 2,
            "encoder_attention_heads": 4, "decoder_attention_heads": 4,
            "encoder_ffn_dim": 128 if small else 256, "decoder_ffn_dim": 128 if small else 256,
            "encoder_vocab_size": 512, "image_vocab_size": 256, "image_length": grid * grid,
            "max_text_length": 24, "dropout": 0.0, "gradient_checkpointing": False,
        },
        vocab_size=512,
        vqgan_train=TrainConfig(steps=150 if small else 600, batch_size=16, learning_rate=4e-3,
                                warmup_steps=20 if small else 50, checkpoint_every=200),
        # ci: 200 steps = 100 epochs of 64 members; tiny: 800 steps = 51 epochs of 500.
        train=TrainConfig(steps=200 if small else 800, batch_size=32, learning_rate=3e-3,
                          warmup_steps=50, checkpoint_every=400),
        sample=DalleSampleConfig(top_k=0, condition_scale=1.5, batch_size=64 if small else 128),
    )


def _ci_tiny_encoder(size: str) -> EncoderConfig:
    small = size == "ci"
    return EncoderConfig(
        clip={
            "projection_dim": 64,
            "text_config": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 2, "num_attention_heads": 4,
                            "max_position_embeddings": 24, "hidden_act": "quick_gelu"},
            "vision_config": {"image_size": 32, "patch_size": 4, "hidden_size": 64,
                              "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "hidden_act": "quick_gelu"},
        },
        vocab_size=512, max_text_length=24,
        # The image-image term lifts the semantic attack from 0.504 to 0.525 AUC on the
        # tiny target's generations (captions never name the per-image detail it needs).
        image_ssl_weight=1.0,
        train=TrainConfig(steps=150 if small else 800, batch_size=64, learning_rate=1e-3,
                          warmup_steps=15 if small else 80, weight_decay=0.1, grad_clip=0.0),
    )


def _preset_ci() -> Config:
    return Config(
        preset="ci",
        # 64 members (target and shadow train on equally many) against 128 non-members, so
        # TPR at 1% FPR is resolvable; the known-member splits are for aux_mode=partial.
        data=DataConfig(image_size=32, splits=SplitsConfig(
            pretrain=256, target_members=64, target_nonmembers=128, target_known_members=0,
            target_known_nonmembers=0, shadow_members=64, shadow_nonmembers=128,
            auxiliary=256)),
        ldm=_ci_tiny_ldm("ci", latent_channels=PUBLIC_LATENT_CHANNELS),
        dalle=_ci_tiny_dalle("ci"),
        # the calibrated attack's reference is the base LDM (as in the default): no
        # reference model is trained, which saves ~45 s of the ci audit's ~3.5 minutes
        adversary=AdversaryConfig(k=2, encoder=_ci_tiny_encoder("ci"), n_bootstrap=1000,
                                  n_shuffles=20, n_reference=0, base_reference=True,
                                  mlp=MLPConfig(hidden=(32,), max_epochs=100, patience=15)),
        # the shipped autoencoder, tokenizer, base LDM and encoder: only the target and the
        # shadow LDMs are trained (fine-tuned from the base)
        public=PublicConfig(components="package"),
    )


def _preset_tiny() -> Config:
    """The embedded default (``python -m t2i_mia.attack``): the target and the shadow are
    fine-tuned from the shipped base LDM on 250 members each (the autoencoder, tokenizer and
    the adversary's encoder are the shipped public components too); 250 members vs 250
    non-members are evaluated, and the base is the calibration reference."""
    cfg = _preset_tiny_scratch()
    cfg.preset = "tiny"
    cfg.ldm = _ci_tiny_ldm("tiny", latent_channels=PUBLIC_LATENT_CHANNELS)
    # pretrain and auxiliary as before: --target dalle-mini still trains its VQGAN on
    # pretrain (the LDM takes its autoencoder and the encoder from the components)
    cfg.data.splits = SplitsConfig(
        pretrain=2000, target_members=250, target_nonmembers=250, target_known_members=0,
        target_known_nonmembers=0, shadow_members=250, shadow_nonmembers=250, auxiliary=1000)
    # 1000 steps = 128 epochs of 250 members; chosen on seed 0: 500 steps gave pixel AUC
    # 0.63 and white-box 0.63 (6.8 min), 1000 steps 0.84 and 0.86 (12.3 min)
    cfg.ldm.train = TrainConfig(steps=1000, batch_size=32, learning_rate=3e-3,
                                warmup_steps=50, checkpoint_every=250)
    # the encoder's recipe (the shipped one's): its image-image term pairs each pool image
    # with its reconstruction through the public autoencoder, against the base LDM's
    # generation of the image's caption as a hard negative, on coarse views, at weight 3.
    # Chosen on seed 0's tiny audit (threshold cosine.max of the evaluation set, encoders of
    # 1000 steps): 0.669 as before, 0.724 coarse, 0.737 hard negatives, 0.766 both, 0.782
    # with weight 3 (10: 0.781, temperature 0.2: 0.701; base-LDM img2img views in place of
    # the reconstructions: 0.720).
    cfg.adversary = AdversaryConfig(
        k=2, encoder=dataclasses.replace(_ci_tiny_encoder("tiny"), ssl_views="autoencoder",
                                         hard_negatives="base", augmentation="coarse",
                                         image_ssl_weight=3.0),
        n_bootstrap=1000, n_shuffles=20, n_reference=0, base_reference=True)
    cfg.public = PublicConfig(components="package")
    return cfg


def _preset_tiny_scratch() -> Config:
    """The previous default: every part trained on the audit's own splits (autoencoder on
    2000 ``pretrain`` images, encoder on 1000 ``auxiliary``, target and shadow 6000 steps
    from scratch on 500 members each), 500 vs 500 evaluated, k = 4 (about 90 minutes on 2
    CPU cores)."""
    return Config(
        preset="tiny-scratch",
        data=DataConfig(image_size=32, splits=SplitsConfig(
            pretrain=2000, target_members=500, target_nonmembers=500, target_known_members=0,
            target_known_nonmembers=0, shadow_members=500, shadow_nonmembers=500,
            auxiliary=1000)),
        ldm=_ci_tiny_ldm("tiny"), dalle=_ci_tiny_dalle("tiny"),
        adversary=AdversaryConfig(k=4, encoder=_ci_tiny_encoder("tiny"), n_bootstrap=1000),
    )


def _preset_paper_ldm() -> Config:
    """Paper scale (256x256, MS-COCO-sized member sets) for accelerators; SD-1.x-like shapes."""
    return Config(
        preset="paper-ldm", target="ldm",
        data=DataConfig(source="coco", image_size=256, splits=SplitsConfig(
            pretrain=50000, target_members=10000, target_nonmembers=10000,
            target_known_members=1000, target_known_nonmembers=1000, shadow_members=10000,
            shadow_nonmembers=10000, auxiliary=20000)),
        ldm=LDMConfig(
            vae={"in_channels": 3, "out_channels": 3, "latent_channels": 4,
                 "down_block_types": ["DownEncoderBlock2D"] * 4,
                 "up_block_types": ["UpDecoderBlock2D"] * 4,
                 "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                 "act_fn": "silu", "norm_num_groups": 32, "sample_size": 256,
                 "scaling_factor": 0.18215},
            unet={"sample_size": 32, "in_channels": 4, "out_channels": 4,
                  "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                  "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                  "attention_head_dim": 8, "cross_attention_dim": 768,
                  "flip_sin_to_cos": True, "freq_shift": 0},
            text_encoder={"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                          "num_hidden_layers": 12, "num_attention_heads": 12,
                          "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                          "projection_dim": 768},
            scheduler=_ci_tiny_ldm("tiny").scheduler,
            vocab_size=49408, max_text_length=77,
            vae_train=TrainConfig(steps=50000, batch_size=256, learning_rate=1e-4),
            train=TrainConfig(steps=200000, batch_size=256, learning_rate=1e-4,
                              warmup_steps=10000, ema_decay=0.9999, checkpoint_every=5000),
            sample=DiffusionSampleConfig(num_inference_steps=50, guidance_scale=7.5,
                                         batch_size=256)),
        adversary=AdversaryConfig(k=4, n_bootstrap=1000, encoder=EncoderConfig(
            clip={"projection_dim": 512,
                  "text_config": {"vocab_size": 49408, "hidden_size": 512,
                                  "intermediate_size": 2048, "num_hidden_layers": 12,
                                  "num_attention_heads": 8, "max_position_embeddings": 77},
                  "vision_config": {"image_size": 224, "patch_size": 32, "hidden_size": 768,
                                    "intermediate_size": 3072, "num_hidden_layers": 12,
                                    "num_attention_heads": 12}},
            vocab_size=49408, max_text_length=77,
            train=TrainConfig(steps=50000, batch_size=1024, learning_rate=5e-4,
                              warmup_steps=5000, weight_decay=0.1, grad_clip=0.0,
                              checkpoint_every=5000))),
    )


def _preset_paper_dalle() -> Config:
    """Paper scale DALL-E mini (256x256, f16 VQGAN -> 256 tokens, dalle-mini sizes)."""
    cfg = _preset_paper_ldm()
    cfg.preset, cfg.target = "paper-dalle", "dalle-mini"
    cfg.dalle = DalleConfig(
        vqgan={"ch": 128, "out_ch": 3, "in_channels": 3, "num_res_blocks": 2,
               "attn_resolutions": [16], "ch_mult": [1, 1, 2, 2, 4], "resolution": 256,
               "z_channels": 256, "double_z": False, "n_embed": 16384, "embed_dim": 256,
               "dropout": 0.0, "resamp_with_conv": True, "give_pre_end": False,
               "num_resolutions": 5},
        bart={"d_model": 1024, "encoder_layers": 12, "decoder_layers": 12,
              "encoder_attention_heads": 16, "decoder_attention_heads": 16,
              "encoder_ffn_dim": 2730, "decoder_ffn_dim": 2730, "encoder_vocab_size": 50264,
              "image_vocab_size": 16384, "image_length": 256, "max_text_length": 64},
        vocab_size=50264,
        vqgan_train=TrainConfig(steps=100000, batch_size=64, learning_rate=1e-4),
        train=TrainConfig(steps=200000, batch_size=256, learning_rate=1e-4,
                          warmup_steps=5000, checkpoint_every=5000),
        sample=DalleSampleConfig(top_k=0, condition_scale=10.0, batch_size=256))
    return cfg


PRESETS = {
    "ci": _preset_ci,
    "tiny": _preset_tiny,
    "tiny-scratch": _preset_tiny_scratch,
    "paper-ldm": _preset_paper_ldm,
    "paper-dalle": _preset_paper_dalle,
}


def get_config(preset: str = "tiny") -> Config:
    """Returns a fresh copy of a preset."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}' (choose one of {sorted(PRESETS)})")
    return PRESETS[preset]()


# ----------------------------------------------------------------------------- overrides

def _to_jsonable(x):
    if isinstance(x, dict):
        return {k: _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    return x


def _get_path(d: dict, path: str):
    cur = d
    for part in path.split("."):
        cur = cur[part]
    return cur


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks/coerces ``value`` to the annotated type ``tp``; errors name the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {tp}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (elem,) = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a JSON object, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _parse_value(text: str) -> Any:
    """``--set`` values are JSON when they parse (numbers, lists, true, null), else strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Sets ``a.b.c`` = value in place, type-checked; inside dict sections any key is allowed
    (it is validated by the model's config class in :func:`validate`)."""
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if dataclasses.is_dataclass(obj):
            fields = {f.name: f for f in dataclasses.fields(obj)}
            if part not in fields:
                raise ConfigError(f"unknown config key '{where}' (known under "
                                  f"'{'.'.join(parts[:i]) or '<root>'}': {sorted(fields)})")
            hints = typing.get_type_hints(type(obj))
            if last:
                cur = getattr(obj, part)
                if dataclasses.is_dataclass(cur):
                    if not isinstance(value, dict):
                        raise ConfigError(f"config key '{where}': expected a JSON object")
                    for k, v in value.items():
                        set_value(cfg, f"{where}.{k}", v)
                else:
                    setattr(obj, part, _coerce(value, hints[part], where))
                return
            obj = getattr(obj, part)
        elif isinstance(obj, dict):
            if last:
                obj[part] = value
                return
            obj = obj.setdefault(part, {})
            if not isinstance(obj, dict):
                raise ConfigError(f"config key '{where}' is not a section")
        else:
            raise ConfigError(f"config key '{where}' is not a section")


def apply_overrides(cfg: Config, overrides: dict | list[str]) -> Config:
    """Applies ``{"a.b": v}`` or ``["a.b=v", ...]`` (the ``--set`` syntax)."""
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set expects key=value, got '{item}'")
            k, v = item.split("=", 1)
            items.append((k.strip(), _parse_value(v.strip())))
    for k, v in items:
        set_value(cfg, k, v)
    return cfg


def load_config(spec: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """``spec``: a preset name or a JSON file path; then ``overrides``; then validation."""
    spec = spec or "tiny"
    if spec in PRESETS:
        cfg = get_config(spec)
    elif os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{spec}: not a valid UTF-8 JSON config ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{spec}: expected a JSON object of config keys")
        cfg = get_config(data.pop("preset", "tiny"))
        try:
            apply_overrides(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{spec}: {e}") from e
    else:
        raise ConfigError(f"--config '{spec}': neither a preset ({sorted(PRESETS)}) nor a file")
    if overrides:
        apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation

def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def validate(cfg: Config) -> Config:
    """Validates values (ranges, enums, combinations), naming the key. The model sub-configs
    (``ldm.unet`` ...) are checked by their own classes in
    :func:`t2i_mia.models.configs.check_model_configs`."""
    _check(cfg.target in TARGETS, "target", f"expected one of {TARGETS}, got {cfg.target!r}")
    _check(cfg.data.source in DATA_SOURCES, "data.source",
           f"expected one of {DATA_SOURCES}, got {cfg.data.source!r}")
    _check(cfg.data.image_size >= 8 and cfg.data.image_size % 8 == 0, "data.image_size",
           f"expected a multiple of 8 >= 8, got {cfg.data.image_size}")
    name = cfg.data.tfds_name
    _check(bool(name.strip()) and name == name.strip(), "data.tfds_name",
           f"expected a TFDS name such as coco_captions, got {name!r}")
    _check(bool(cfg.data.tfds_split.strip()), "data.tfds_split",
           f"expected a TFDS split such as train+restval, got {cfg.data.tfds_split!r}")
    for f in dataclasses.fields(cfg.data.splits):
        _check(getattr(cfg.data.splits, f.name) >= 0, f"data.splits.{f.name}", "must be >= 0")
    a = cfg.adversary
    _check(a.caption_source in CAPTION_SOURCES, "adversary.caption_source",
           f"expected one of {CAPTION_SOURCES}, got {a.caption_source!r}")
    _check(a.aux_mode in AUX_MODES, "adversary.aux_mode",
           f"expected one of {AUX_MODES}, got {a.aux_mode!r}")
    _check(a.k >= 1, "adversary.k", f"must be >= 1, got {a.k}")
    _check(0.0 < a.mlp.val_fraction < 0.5, "adversary.mlp.val_fraction", "must be in (0, 0.5)")
    _check(a.mlp.embeddings in MLP_EMBEDDINGS, "adversary.mlp.embeddings",
           f"expected one of {MLP_EMBEDDINGS}, got {a.mlp.embeddings!r}")
    _check(a.n_bootstrap >= 0, "adversary.n_bootstrap", "must be >= 0")
    _check(isinstance(a.n_shuffles, int) and a.n_shuffles >= 2, "adversary.n_shuffles",
           "must be an integer >= 2 (the control's CI needs the spread between shuffles)")
    _check(isinstance(a.n_reference, int) and a.n_reference >= 0, "adversary.n_reference",
           "must be an integer >= 0 (0 = no calibrated attack)")
    _check(isinstance(a.base_reference, bool), "adversary.base_reference",
           f"must be true or false, got {a.base_reference!r}")
    _check(a.pixel_coarse_side >= 0, "adversary.pixel_coarse_side",
           f"must be >= 0 (0 = no coarse pixel feature), got {a.pixel_coarse_side}")
    _check(cfg.mesh.model >= 1, "mesh.model", "must be >= 1")
    _check(cfg.mesh.data == -1 or cfg.mesh.data >= 1, "mesh.data", "must be -1 or >= 1")
    for key in ("dtype", "param_dtype"):
        _check(getattr(cfg.precision, key) in PRECISIONS, f"precision.{key}",
               f"expected one of {list(PRECISIONS)}, got {getattr(cfg.precision, key)!r}")
    for i, rule in enumerate(cfg.mesh.rules):
        where = f"mesh.rules[{i}]"
        _check(len(rule) >= 2 and isinstance(rule[0], str), where,
               f"expected [regex, axis, ...] (an axis, or null, per dimension), got {list(rule)}")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ConfigError(f"config key '{where}': {rule[0]!r} is not a valid regex ({e})")
        _check(all(a in (None, "data", "model") for a in rule[1:]), where,
               f"axes must be 'data', 'model' or null, got {list(rule[1:])}")
    _check(0.0 <= cfg.ldm.caption_dropout < 1.0, "ldm.caption_dropout", "must be in [0, 1)")
    _check(cfg.ldm.timestep_power > 0, "ldm.timestep_power", "must be > 0")
    _check(cfg.adversary.encoder.image_ssl_weight >= 0, "adversary.encoder.image_ssl_weight",
           "must be >= 0")
    enc = cfg.adversary.encoder
    # (key, allowed values, the value that needs no image-image term, or None)
    for key, allowed, off in (("ssl_views", SSL_VIEWS, "augment"),
                              ("hard_negatives", HARD_NEGATIVES, "none"),
                              ("augmentation", AUGMENTATIONS, None)):
        value = getattr(enc, key)
        _check(value in allowed, f"adversary.encoder.{key}",
               f"expected one of {allowed}, got {value!r}")
        _check(off is None or value == off or enc.image_ssl_weight > 0,
               f"adversary.encoder.{key}",
               f"{value!r} is the image-image term's: need image_ssl_weight > 0")
    _check(cfg.adversary.encoder.hard_negative_weight >= 0,
           "adversary.encoder.hard_negative_weight",
           f"must be >= 0, got {cfg.adversary.encoder.hard_negative_weight}")
    _check(cfg.ldm.sample.eta >= 0.0, "ldm.sample.eta", "must be >= 0")
    _check(0.0 <= cfg.dalle.caption_dropout < 1.0, "dalle.caption_dropout", "must be in [0, 1)")
    for name, t in (("ldm.train", cfg.ldm.train), ("ldm.vae_train", cfg.ldm.vae_train),
                    ("ldm.base_train", cfg.ldm.base_train), ("dalle.train", cfg.dalle.train),
                    ("dalle.vqgan_train", cfg.dalle.vqgan_train),
                    ("adversary.encoder.train", a.encoder.train)):
        _check(t.steps >= 0, f"{name}.steps", "must be >= 0")
        _check(t.batch_size >= 1, f"{name}.batch_size", "must be >= 1")
        _check(t.learning_rate > 0, f"{name}.learning_rate", "must be > 0")
        _check(0.0 <= t.ema_decay < 1.0, f"{name}.ema_decay", "must be in [0, 1)")
        _check(t.checkpoint_every >= 1, f"{name}.checkpoint_every", "must be >= 1")
    pub = cfg.public
    _check(pub.components is None or bool(pub.components.strip()), "public.components",
           "expected null, 'package' or a components folder")
    _check(pub.pool >= 16, "public.pool", f"must be >= 16, got {pub.pool}")
    _check(pub.heldout >= 8, "public.heldout", f"must be >= 8, got {pub.heldout}")
    _check(0.0 < a.known_fraction < 1.0, "adversary.known_fraction",
           f"must be in (0, 1), got {a.known_fraction}")
    sets = cfg.data.sets
    if sets.explicit:
        _check(bool(sets.members and sets.nonmembers), "data.sets",
               "--members and --nonmembers go together (the sets under audit)")
        _check(bool(sets.shadow_members) == bool(sets.shadow_nonmembers), "data.sets",
               "--shadow-members and --shadow-nonmembers go together")
        _check(a.aux_mode != "shadow" or bool(sets.shadow_members), "adversary.aux_mode",
               "shadow with explicit sets needs --shadow-dir, --shadow-members and "
               "--shadow-nonmembers (or use partial or none)")
    else:
        _check(not (sets.shadow_members or sets.shadow_nonmembers or sets.aux), "data.sets",
               "--shadow-members, --shadow-nonmembers and --aux go with --members and "
               "--nonmembers")
    if a.aux_mode == "partial" and not sets.explicit:
        s = cfg.data.splits
        _check(s.target_known_members >= 2 and s.target_known_nonmembers >= 2,
               "data.splits.target_known_members",
               "partial-knowledge mode needs >= 2 known members and non-members")
    return cfg
