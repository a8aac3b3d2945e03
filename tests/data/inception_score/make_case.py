"""Reference for the Inception Score as torch-fidelity computes it (see README.md).

    /tmp/lpvenv/bin/python tests/data/inception_score/make_case.py
    (torch 2.15.0, torch-fidelity 0.4.0, pytorch-fid 0.3.0, safetensors, numpy; CPU;
     writes is_cases.safetensors next to this file)

Reads ../shared/reference/eval/{inception_cases,inception_fid_random}.safetensors
(relative to the repository root; /work/shared/... also works).
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import pytorch_fid.inception as pfi
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tfe
from torch_fidelity.metric_isc import isc_features_to_metric, KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
EVAL = next(p for p in (os.path.join(ROOT, "..", "shared", "reference", "eval"),
                        "/work/shared/reference/eval") if os.path.isdir(p))

torch.set_num_threads(4)


def isc_float64(logits, splits):
    """Independent float64 recomputation (numpy), same split rule as torch-fidelity."""
    x = np.asarray(logits, dtype=np.float64)
    n = x.shape[0]
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    scores = []
    for i in range(splits):
        a, b = i * n // splits, (i + 1) * n // splits
        q = p[a:b].mean(axis=0)
        kl = (p[a:b] * (logp[a:b] - np.log(q))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores)), scores  # np.std: ddof=0


out = {}

# ---- 1. synthetic logits [100, 1008] --------------------------------------------------
N, C, K, BUMP = 100, 1008, 20, 8.0
g = torch.Generator().manual_seed(20240607)
centres = torch.randperm(C, generator=g)[:K]                       # 20 distinct classes
label = centres[torch.randint(0, K, (N,), generator=g)]            # one per row
logits = 0.5 * torch.randn(N, C, generator=g)
logits[torch.arange(N), label] += BUMP
logits = logits.float().contiguous()

m10 = isc_features_to_metric(logits, splits=10, shuffle=False)
m1 = isc_features_to_metric(logits, splits=1, shuffle=False)
out["logits"] = logits
out["is_mean_10"] = torch.tensor([m10[KEY_METRIC_ISC_MEAN]], dtype=torch.float64)
out["is_std_10"] = torch.tensor([m10[KEY_METRIC_ISC_STD]], dtype=torch.float64)
out["is_mean_1"] = torch.tensor([m1[KEY_METRIC_ISC_MEAN]], dtype=torch.float64)

r10, s10, sc10 = isc_float64(logits.numpy(), 10)
r1, _, _ = isc_float64(logits.numpy(), 1)
print("torch-fidelity splits=10:", m10, " splits=1:", m1)
print("numpy float64  splits=10: mean %.17g std %.17g ; splits=1: %.17g" % (r10, s10, r1))
print("per-split scores:", ["%.6f" % s for s in sc10])
print("rel diffs:", abs(r10 - m10[KEY_METRIC_ISC_MEAN]) / r10, abs(s10 - m10[KEY_METRIC_ISC_STD]) / s10,
      abs(r1 - m1[KEY_METRIC_ISC_MEAN]) / r1)
print("(torch-fidelity default shuffle=True, rng_seed=2020, splits=10 would give:",
      isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020), ")")

# ---- 2. logits_unbiased of the 8 images through pytorch-fid's network ------------------
sd = load_file(os.path.join(EVAL, "inception_fid_random.safetensors"))
cases = load_file(os.path.join(EVAL, "inception_cases.safetensors"))
images_u8 = cases["images_u8"]

pfi.load_state_dict_from_url = lambda *a, **k: sd  # no download: random weights
net = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
with torch.no_grad():
    pool = net(images_u8.float() / 255.0)[0].squeeze(-1).squeeze(-1)   # [8, 2048] float32
ref = cases["features"]
print("pool vs shared inception_cases features: max rel L2 %.3g" %
      ((pool.double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item())

W = sd["fc.weight"]                                                    # [1008, 2048]
lu32 = pool.mm(W.T)                              # torch-fidelity: x.mm(self.fc.weight.T) in float32
lu64 = pool.double().mm(W.double().T)           # stored: same product in float64
print("logits_unbiased float32 vs float64 product: max rel L2 %.3g" %
      ((lu32.double() - lu64).norm(dim=1) / lu64.norm(dim=1)).max().item())
out["pool_8"] = pool.double()
out["logits_unbiased_8"] = lu64
m8 = isc_features_to_metric(lu64, splits=1, shuffle=False)
out["is_mean_8_1"] = torch.tensor([m8[KEY_METRIC_ISC_MEAN]], dtype=torch.float64)
print("IS of the 8 images (splits=1):", m8, " numpy:", isc_float64(lu64.numpy(), 1)[0])

# ---- 3. cross-check against torch-fidelity's own extractor with the same weights --------
tmp = os.path.join("/tmp", "is_case_random_inception.pth")
torch.save(sd, tmp)
fe = tfe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                     feature_extractor_weights_path=tmp)
with torch.no_grad():
    tf_pool, tf_lu = fe(images_u8)  # torch-fidelity's own preprocessing (TF1 resize, (x-128)/128)
print("torch-fidelity own preprocessing vs pytorch-fid path: pool rel L2 %.3g, logits_unbiased rel L2 %.3g" % (
    ((tf_pool.double() - pool.double()).norm(dim=1) / pool.double().norm(dim=1)).max().item(),
    ((tf_lu.double() - lu64).norm(dim=1) / lu64.norm(dim=1)).max().item()))
print("  IS (splits=1) with torch-fidelity's own extractor:",
      isc_features_to_metric(tf_lu, splits=1, shuffle=False)[KEY_METRIC_ISC_MEAN])

# same network, pytorch-fid preprocessing injected: y such that (y-128)/128 == 2*resize(x/255)-1
orig = tfe.interpolate_bilinear_2d_like_tensorflow1x
tfe.interpolate_bilinear_2d_like_tensorflow1x = lambda x, size, align_corners: 128.0 * (
    2 * F.interpolate(x / 255.0, size=size, mode="bilinear", align_corners=False) - 1) + 128.0
with torch.no_grad():
    tf_pool2, tf_lu2 = fe(images_u8)
tfe.interpolate_bilinear_2d_like_tensorflow1x = orig
print("torch-fidelity network with pytorch-fid preprocessing vs pytorch-fid: pool rel L2 %.3g, "
      "logits_unbiased rel L2 %.3g" % (
          ((tf_pool2.double() - pool.double()).norm(dim=1) / pool.double().norm(dim=1)).max().item(),
          ((tf_lu2.double() - lu64).norm(dim=1) / lu64.norm(dim=1)).max().item()))
os.remove(tmp)

save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(HERE, "is_cases.safetensors"))
print("versions: torch", torch.__version__, "torch-fidelity", torch_fidelity.__version__, "numpy", np.__version__)
for k, v in out.items():
    print(k, tuple(v.shape), v.dtype, v.flatten()[:3].tolist())
