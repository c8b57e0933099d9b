"""Model variants as data.

Every SAM 2 variant is a frozen :class:`SAM2Config`. The official SAM 2.0 and
SAM 2.1 checkpoints differ only in a handful of fields (how object pointers get
their temporal encoding and whether an embedding marks "no object" in memory),
so 2.1 configs are derived from 2.0 ones with :func:`dataclasses.replace`.

``MODELS`` maps registry names (``"sam2.1_hiera_tiny"``...) to configs;
:func:`get_config` looks a name up and lists the valid names when it fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Tuple

__all__ = [
    "DEFAULT_MODEL",
    "MEDSAM2",
    "MODELS",
    "NANO",
    "ORIENTATION_CHOICES",
    "HieraConfig",
    "ModelProfile",
    "SAM2Config",
    "get_config",
    "register",
]


@dataclass(frozen=True)
class HieraConfig:
    """Hiera trunk hyper-parameters (names follow the checkpoint's trunk)."""

    embed_dim: int = 96
    num_heads: int = 1
    stages: Tuple[int, ...] = (1, 2, 7, 2)
    global_att_blocks: Tuple[int, ...] = (5, 7, 9)
    window_spec: Tuple[int, ...] = (8, 4, 14, 7)
    window_pos_embed_bkg_spatial_size: Tuple[int, int] = (7, 7)
    q_pool: int = 3
    q_stride: Tuple[int, int] = (2, 2)
    dim_mul: float = 2.0
    head_mul: float = 2.0
    mlp_ratio: float = 4.0

    @property
    def channel_list(self) -> Tuple[int, ...]:
        """Output channels of each stage, lowest resolution first (neck order)."""
        dims = [int(self.embed_dim * self.dim_mul**i) for i in range(len(self.stages))]
        return tuple(reversed(dims))


#: the intensity percentiles mapped to black..white when no range is given (a model's
#: profile may choose others)
DEFAULT_PERCENTILES: Tuple[float, float] = (0.5, 99.5)


@dataclass(frozen=True)
class ModelProfile:
    """How a model is best used, beside its architecture: what the widget, the command line
    and the annotator start with for it (each can still be changed by the user).

    orientations: track in this many orientations and average (1: plain SAM 2);
    corrections_as_conditioning: a correction on a tracked slice becomes a conditioning
    slice, kept when propagating again (the reference keeps it only in memory);
    percentiles: the intensity percentiles mapped to black..white when no contrast is given.
    """

    orientations: int = 1
    corrections_as_conditioning: bool = True
    percentiles: Tuple[float, float] = DEFAULT_PERCENTILES


@dataclass(frozen=True)
class SAM2Config:
    """Everything needed to build a SAM 2 model.

    Defaults describe SAM 2.0 tiny at 1024 px. Field names mirror the reference
    implementation's config keys where one exists, so a reader can compare.
    """

    name: str = "sam2_hiera_tiny"
    version: str = "2.0"
    trunk: HieraConfig = field(default_factory=HieraConfig)
    image_size: int = 1024
    backbone_stride: int = 16
    d_model: int = 256  # hidden dim of neck, prompt encoder, decoder, memory attention
    mem_dim: int = 64  # channels of the memory bank
    fpn_top_down_levels: Tuple[int, ...] = (2, 3)
    scalp: int = 1  # number of lowest-resolution FPN levels discarded
    # SAM heads (fixed in the official models; fields so that tiny test configs stay small)
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    # memory attention / encoder
    memory_attention_layers: int = 4
    memory_attention_ffn_dim: int = 2048
    memory_attention_heads: int = 1
    rope_theta: float = 10000.0
    fuser_layers: int = 2
    num_maskmem: int = 7
    max_obj_ptrs_in_encoder: int = 16
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    # SAM 2.0 vs 2.1
    no_obj_embed_spatial: bool = False
    add_tpos_enc_to_obj_ptrs: bool = False
    proj_tpos_enc_in_obj_ptrs: bool = False
    use_signed_tpos_enc_to_obj_ptrs: bool = False
    # how it is used, not what it is
    profile: ModelProfile = ModelProfile()

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 at 1024 px)."""
        return self.image_size // self.backbone_stride

    def with_image_size(self, image_size: int) -> "SAM2Config":
        """The same model at another input resolution (weights are resolution-free)."""
        if image_size % 32 != 0 or image_size < 64:
            raise ValueError(
                f"image_size must be a multiple of 32 and at least 64, got {image_size}"
            )
        return replace(self, image_size=image_size)


def _v21(cfg: SAM2Config, name: str) -> SAM2Config:
    return replace(
        cfg,
        name=name,
        version="2.1",
        no_obj_embed_spatial=True,
        add_tpos_enc_to_obj_ptrs=True,
        proj_tpos_enc_in_obj_ptrs=True,
        use_signed_tpos_enc_to_obj_ptrs=True,
    )


_TINY = HieraConfig()
_SMALL = HieraConfig(stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13))
_BASE_PLUS = HieraConfig(
    embed_dim=112,
    num_heads=2,
    stages=(2, 3, 16, 3),
    global_att_blocks=(12, 16, 20),
    window_pos_embed_bkg_spatial_size=(14, 14),
)
_LARGE = HieraConfig(
    embed_dim=144,
    num_heads=2,
    stages=(2, 6, 36, 4),
    global_att_blocks=(23, 33, 43),
    window_spec=(8, 4, 16, 8),
)

MODELS: Dict[str, SAM2Config] = {}


def register(cfg: SAM2Config) -> SAM2Config:
    """Add a config to the registry under ``cfg.name`` (names are unique)."""
    if cfg.name in MODELS:
        raise ValueError(f"a model named {cfg.name!r} is already registered")
    MODELS[cfg.name] = cfg
    return cfg


for _size, _trunk in (
    ("tiny", _TINY),
    ("small", _SMALL),
    ("base_plus", _BASE_PLUS),
    ("large", _LARGE),
):
    _v20 = register(SAM2Config(name=f"sam2_hiera_{_size}", trunk=_trunk))
    register(_v21(_v20, f"sam2.1_hiera_{_size}"))

# MedSAM2 fine-tunes SAM 2.1 tiny at 512 px: the same weights layout, a smaller input (its
# RoPE grids follow: 32 x 32); its file is downloaded by this name (checkpoint.CHECKPOINTS).
# Other 512 px fine-tunes of 2.1 tiny load into it too.
MEDSAM2 = register(replace(MODELS["sam2.1_hiera_tiny"], name="medsam2", image_size=512))

# A "nano" SAM 2.1 (1.25 M parameters) meant for CPUs and offline use: a narrow
# five-block Hiera, 64-wide heads and memory, 128 px input. Trained from scratch
# on generated stacks by scripts/train_nano.py (docs/training.md).
NANO = register(
    _v21(
        SAM2Config(
            trunk=HieraConfig(
                embed_dim=24,
                num_heads=1,
                stages=(1, 1, 2, 1),
                global_att_blocks=(3,),
                window_spec=(8, 4, 8, 4),
                window_pos_embed_bkg_spatial_size=(4, 4),
            ),
            image_size=128,
            d_model=64,
            mem_dim=32,
            decoder_heads=4,
            decoder_mlp_dim=256,
            iou_head_hidden_dim=64,
            mask_in_chans=16,
            memory_attention_layers=2,
            memory_attention_ffn_dim=256,
            fuser_layers=1,
            # small enough that eight trackers cost ~1.2 s per 32 slices on two CPU cores, and
            # 0.02-0.03 better in 3D Dice (docs/benchmarks.md)
            profile=ModelProfile(orientations=8),
        ),
        "sam2.1_nano_synthetic",
    )
)


# what the widget and the command line use unless told otherwise: the bundled nano model,
# which works offline at once (a demo trained on generated data; choose an official
# SAM 2.1 model for real work)
DEFAULT_MODEL = NANO.name


def get_config(name: str) -> SAM2Config:
    """Return the registered config called ``name``."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(
            f"unknown model {name!r}; registered models are: {', '.join(sorted(MODELS))}"
        ) from None

# how many orientations a stack session may track in (model.ensemble); kept here, free
# of torch, so that the command line can offer them without importing the engine
ORIENTATION_CHOICES = (1, 2, 4, 8)
