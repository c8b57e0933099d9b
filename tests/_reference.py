"""Helpers to build Meta's reference SAM 2 (``sam2==1.1.0``) for parity tests.

The reference is a test dependency only. Its models are built from its own
hydra configs, given random weights, and those weights are copied key by key
into our model with a strict load.
"""

from __future__ import annotations

import pytest
import torch

REFERENCE_CONFIGS = {
    "sam2_hiera_tiny": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_small": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_base_plus": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_large": "configs/sam2/sam2_hiera_l.yaml",
    "sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}


def require_reference():
    return pytest.importorskip("sam2.build_sam", reason="Meta's sam2==1.1.0 is not installed (see .ci/run)")


# learned embeddings that start near zero: given unit-scale values so that the
# tests notice when one is used in the wrong place
_EMBEDDINGS = (
    "maskmem_tpos_enc", "no_mem_embed", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial",
    "trunk.pos_embed", "trunk.pos_embed_window",
)


def randomize_(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    """Perturb every parameter and buffer so that no weight keeps a constant init,
    and give the small learned embeddings values of order one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith(_EMBEDDINGS) or name.endswith("obj_ptr_tpos_proj.bias"):
                t.copy_(0.5 * torch.randn(t.shape, generator=g))
            else:
                t.add_(scale * torch.randn(t.shape, generator=g))


def build_reference(name: str, *, seed: int, image_size: int = 1024, video: bool = False, extra=(), object_score_bias: float = 8.0):
    """The reference model for registry ``name`` with seeded random weights."""
    build_sam = require_reference()
    torch.manual_seed(seed)
    overrides = [f"++model.image_size={image_size}", *extra]
    if video:
        ref = build_sam.build_sam2_video_predictor(
            REFERENCE_CONFIGS[name], None, device="cpu", hydra_overrides_extra=overrides
        )
    else:
        ref = build_sam.build_sam2(REFERENCE_CONFIGS[name], None, device="cpu", hydra_overrides_extra=overrides)
    randomize_(ref, seed + 1)
    if video:
        # random weights give random object scores; a negative one turns every tracked
        # mask into the constant "no object" logit and would make comparisons vacuous
        with torch.no_grad():
            ref.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(object_score_bias)
        # its hole filling needs the CUDA extension and is skipped without it; say so explicitly
        ref.fill_hole_area = 0
    return ref.eval()


def ours_from_reference(name: str, ref, *, image_size: int = 1024):
    """Our model for ``name`` with the reference's weights (strict load)."""
    from napari_sam2.model import build_model, get_config

    model = build_model(get_config(name).with_image_size(image_size))
    model.load_state_dict(ref.state_dict(), strict=True)
    return model.eval()
