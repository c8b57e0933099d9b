"""Where a model's memory attention looks: spatial memories or object pointers.

Clicks the largest nucleus of a generated stack, propagates a few slices and
prints, for each memory-attention layer, the share of attention weight that
goes to the object-pointer tokens (the rest goes to the spatial memories). A
share of 1.000 in every layer means the memory attention has collapsed onto
the pointers: no gradient reaches the memory encoder any more, and the model
follows objects only from a 64-number summary (docs/training.md).

    .venv/bin/python scripts/memory_attention_share.py runs/nano/stage3/weights.pt
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from napari_sam2.model import memory as memory_module
from napari_sam2.model.checkpoint import load_model
from napari_sam2.model.evaluate import central_pixel
from napari_sam2.model.video import StackSession
from napari_sam2.sample_data import nuclei_3d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", help="weights file (any registered architecture)")
    ap.add_argument("--seed", type=int, default=9000, help="nuclei_3d seed")
    ap.add_argument("--slices", type=int, default=6, help="slices to propagate")
    args = ap.parse_args()
    model = load_model(None, args.weights)
    shares = {i: [] for i in range(len(model.memory_attention.layers))}
    n_ptr = [0]

    def watch(index, attn):
        def attend(q, k, v, _orig=attn._attend):
            weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
            if n_ptr[0]:
                shares[index].append(float(weights[..., -n_ptr[0]:].sum(-1).mean()))
            return _orig(q, k, v)

        attn._attend = attend

    for i, layer in enumerate(model.memory_attention.layers):
        watch(i, layer.cross_attn_image)
    forward = memory_module.MemoryAttention.forward

    def counting(self, curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens=0):
        n_ptr[0] = num_obj_ptr_tokens
        return forward(self, curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens)

    memory_module.MemoryAttention.forward = counting
    image, labels = nuclei_3d(seed=args.seed)
    k = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    present = np.flatnonzero((labels == k).any(axis=(1, 2)))
    z = int(present[len(present) // 2])
    session = StackSession(model, image)
    session.add_points(z, 1, points=[central_pixel(labels[z] == k)], labels=[1])
    for t, _ in session.propagate("forward", start=z):
        if t >= z + args.slices:
            break
    for i, values in shares.items():
        print(f"layer {i}: share of attention on object pointers {np.mean(values):.3f} ({len(values)} slices)")


if __name__ == "__main__":
    main()
