"""Interactive segmentation of one 2D image.

Example::

    predictor = ImagePredictor(load_model("sam2.1_hiera_tiny"))  # or load_model() for the bundled nano model
    predictor.set_image(image, intensity_range=(100, 3000))
    result = predictor.predict(points=[[120, 80]], labels=[1])
    result.masks  # 3 x H x W bool (multimask by default for a single click)

Coordinates are pixel coordinates of the image as given, in (x, y) order:
x is the column, y the row, and pixel (r, c) has its centre at x = c, y = r.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .devices import autocast_context
from .geometry import xy_to_model
from .preprocess import (
    InputError,
    check_image,
    check_range,
    default_intensity_range,
    resize_to_model,
    to_unit_rgb,
)
from .prompts import check_prompts
from .sam2 import LOGIT_CLAMP, FrameFeatures, SAM2Model


@dataclass
class Prediction:
    """Result of :meth:`ImagePredictor.predict`.

    With B boxes (B > 1) every array gains a leading B axis.
    masks: M H W bool at the image's resolution; iou: M predicted IoU;
    low_res_logits: M 4h 4w logits (pass one back as ``mask_input``);
    object_score: logit that the object is present (> 0: present).
    """

    masks: np.ndarray
    iou: np.ndarray
    low_res_logits: np.ndarray
    object_score: np.ndarray
    logits: Optional[np.ndarray] = None


class ImagePredictor:
    """Caches one image's embedding and turns prompts into masks.

    ``fast=True`` runs the model under bfloat16 autocast (CPUs with AVX-512
    BF16 or AMX, recent GPUs); results are close to, not identical with,
    float32 ones (see docs/benchmarks.md).
    """

    def __init__(self, model: SAM2Model, *, fast: bool = False, mask_threshold: float = 0.0) -> None:
        self.model = model.eval()
        self.fast = fast
        self.mask_threshold = mask_threshold
        self.reset_image()

    # --------------------------------------------------------------- image

    def reset_image(self) -> None:
        self._features: Optional[FrameFeatures] = None
        self._orig_hw: Optional[Tuple[int, int]] = None
        # decoder projections that depend on the image only (valid without a mask prompt)
        self._decoder_cache: dict = {}

    @property
    def is_image_set(self) -> bool:
        return self._features is not None

    @property
    def _amp(self):
        return autocast_context(self.model.device, torch.bfloat16 if self.fast else None)

    def prepare_image(self, image, intensity_range: Optional[Sequence[float]] = None) -> torch.Tensor:
        """The normalised 1 3 S S model input for ``image`` (see :meth:`set_image`)."""
        arr = check_image(image)
        rng = check_range(intensity_range) or default_intensity_range(arr, self.model.config.profile.percentiles)
        unit = to_unit_rgb(arr, rng).to(self.model.device)
        return self.model.normalize(resize_to_model(unit, self.model.image_size))

    @torch.inference_mode()
    def set_image(self, image, intensity_range: Optional[Sequence[float]] = None) -> None:
        """Compute and cache the embedding of ``image``.

        image: H x W (grey) or H x W x 3 (RGB); uint8, uint16, any int or float.
        intensity_range: (low, high) mapped to black and white, e.g. napari's
        contrast limits; default (0, 255) for uint8, else the model profile's percentiles
        (0.5 and 99.5 for every registered model), as a stack's slices are mapped.
        """
        x = self.prepare_image(image, intensity_range)
        arr_hw = np.shape(image)[:2]
        with self._amp:
            feats = self.model.frame_features(x)
        # the image-only path adds the "no memory" embedding to the features
        embed = feats.image_embed.float() + self.model.no_mem_embed.view(1, -1, 1, 1)
        self._features = FrameFeatures(embed, [h.float() for h in feats.high_res], feats.pos.float())
        self._decoder_cache = {}
        self._orig_hw = (int(arr_hw[0]), int(arr_hw[1]))

    def get_image_embedding(self) -> torch.Tensor:
        """The cached 1 C h w embedding."""
        self._require_image()
        return self._features.image_embed

    @property
    def image_features(self) -> FrameFeatures:
        """The cached features of the image: its embedding, the high-resolution levels the
        mask decoder uses, and the positional encoding."""
        self._require_image()
        return self._features

    def _require_image(self) -> None:
        if self._features is None:
            raise InputError("no image is set: call set_image(image) before predict()")

    # --------------------------------------------------------------- prompts

    def _prompts(self, points, labels, box):
        """Validate and convert prompts to model-input tensors (B P 2, B P); (None, None) without any."""
        coords, labs = check_prompts(points, labels, box, self._orig_hw)
        if coords is None:
            return None, None
        coords = xy_to_model(coords, self._orig_hw, self.model.image_size)
        dev = self.model.device
        return torch.from_numpy(np.ascontiguousarray(coords)).to(dev), torch.from_numpy(np.ascontiguousarray(labs)).to(dev)

    @torch.inference_mode()
    def predict_batch(
        self, points_xy: torch.Tensor, labels: torch.Tensor, *, multimask_output: bool = True
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Many prompts at once on the cached image, as tensors (no checks, no copies to
        numpy): ``points_xy`` B x P x 2 pixels of the image, ``labels`` B x P. Returns the
        decoder's low-resolution logits (B M h w, see :meth:`to_image_size`) and predicted
        IoUs (B M); M = 3 with ``multimask_output``, else 1."""
        self._require_image()
        h, w = self._orig_hw
        size = self.model.image_size
        scale = torch.tensor([size / w, size / h], dtype=torch.float32, device=points_xy.device)
        coords = (points_xy.float() * scale).to(self.model.device)
        feats = self._features
        with self._amp:
            sparse, dense = self.model.sam_prompt_encoder((coords, labels.to(self.model.device).int()), None,
                                                          batch_size=coords.shape[0])
            dec = self.model.sam_mask_decoder(
                image_embeddings=feats.image_embed, image_pe=self.model.sam_prompt_encoder.dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask_output,
                repeat_image=coords.shape[0] > 1, high_res_features=feats.high_res, cache=self._decoder_cache,
            )
        return dec.masks.float(), dec.iou.float()

    def to_image_size(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits (N C h w) -> logits at the cached image's size (bilinear)."""
        return F.interpolate(low_res, size=self._orig_hw, mode="bilinear", align_corners=False)

    @torch.inference_mode()
    def predict(
        self,
        points=None,
        labels=None,
        box=None,
        mask_input=None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Prediction:
        """Segment the cached image.

        points: N x 2 (x, y) pixels; labels: N (1 positive, 0 negative);
        box: (x0, y0, x1, y1) or B x 4 for B objects at once;
        mask_input: 1 x 4h x 4w (or 4h x 4w) logits from an earlier prediction.
        """
        self._require_image()
        coords, labs = self._prompts(points, labels, box)
        mask_t = None
        if mask_input is not None:
            m = np.asarray(mask_input, dtype=np.float32)
            side = self.model.sam_prompt_encoder.mask_input_size
            if m.ndim == 2:
                m = m[None]
            if m.ndim == 3:
                m = m[:, None] if m.shape[0] > 1 else m[None]
            if m.ndim != 4 or tuple(m.shape[-2:]) != tuple(side) or m.shape[1] != 1:
                raise InputError(
                    f"mask_input must be low-resolution logits of shape {side} (the low_res_logits "
                    f"of an earlier prediction), got shape {np.shape(mask_input)}"
                )
            mask_t = torch.from_numpy(m).to(self.model.device)
        if coords is None and mask_t is None:
            raise InputError("give at least one prompt: points with labels, a box, or mask_input")
        feats = self._features
        with self._amp:
            batch = coords.shape[0] if coords is not None else mask_t.shape[0]
            sparse, dense = self.model.sam_prompt_encoder(
                (coords, labs) if coords is not None else None, mask_t, batch_size=batch
            )
            dec = self.model.sam_mask_decoder(
                image_embeddings=feats.image_embed,
                image_pe=self.model.sam_prompt_encoder.dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
                repeat_image=sparse.shape[0] > 1,
                high_res_features=feats.high_res,
                cache=self._decoder_cache if mask_t is None else None,
            )
        low = dec.masks.float()
        full = F.interpolate(low, size=self._orig_hw, mode="bilinear", align_corners=False)
        low = low.clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
        out = Prediction(
            masks=(full > self.mask_threshold).cpu().numpy(),
            iou=dec.iou.float().cpu().numpy(),
            low_res_logits=low.cpu().numpy(),
            object_score=dec.object_score.float().cpu().numpy()[:, 0],
            logits=full.cpu().numpy() if return_logits else None,
        )
        if out.masks.shape[0] == 1:  # one object: drop the batch axis
            out = Prediction(
                out.masks[0], out.iou[0], out.low_res_logits[0], out.object_score[0],
                None if out.logits is None else out.logits[0],
            )
        return out
