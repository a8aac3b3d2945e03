"""Reference for `dmd_models::lpips::upsample_bilinear`: PyTorch's bilinear `interpolate` with
`align_corners=False`, which DMD applies before LPIPS when images are smaller than 224.

    python3 tests/data/resize/make_case.py   (torch 2.15, safetensors; writes resize_cases.safetensors)
"""
import os
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

g = torch.Generator().manual_seed(0)
small = torch.rand(1, 1, 16, 16, generator=g) * 2 - 1  # a 16x16 image channel, upsampled to 224
odd = torch.rand(2, 3, 7, 9, generator=g) * 2 - 1      # non-square, non-integer scale factors
out = {
    "small": small,
    "small_224": F.interpolate(small, size=(224, 224), mode="bilinear", align_corners=False),
    "odd": odd,
    "odd_20x31": F.interpolate(odd, size=(20, 31), mode="bilinear", align_corners=False),
}
save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(os.path.dirname(__file__), "resize_cases.safetensors"))
