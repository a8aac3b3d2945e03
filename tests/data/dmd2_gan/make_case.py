#!/usr/bin/env python3
"""Regenerate the DMD2 GAN-term reference case in this folder.

Nothing from EDM or DMD2 is vendored here. Both are extracted from their git
mirrors into /tmp and imported when the case is generated. Run this from the
repository root:

    mkdir -p /tmp/edm /tmp/dmd2
    git --git-dir=/work/.mirror/NVlabs+edm/repo archive HEAD | tar -x -C /tmp/edm
    git --git-dir=/work/.mirror/tianweiy+DMD2/repo archive HEAD | tar -x -C /tmp/dmd2
    PYTHONPATH=/tmp/edm python3 tests/data/dmd2_gan/make_case.py

Options: `--out DIR` (default: the folder of this script), `--shared DIR`
(default: /work/shared, or ../shared next to the repository), `--dmd2 DIR`
(default: /tmp/dmd2), `--report FILE` (write the checks and the
float32-vs-float64 table as JSON).

What it computes (see README.md for the tensor list):

  * fake score network: the official EDM `EDMPrecond` (training/networks.py of
    NVlabs/edm) built from `reference/edm/adm_tiny.json` and loaded with
    `reference/dmd/adm_tiny_fake.safetensors`;
  * bottleneck: a small wrapper in this file. It runs the official module's
    mapping network (map_noise, map_layer0, map_layer1, map_label) and its
    encoder blocks (`model.enc`), then stops. The input is c_in * x and the noise
    label is ln(sigma) / 4, as in EDMPrecond. This is what DMD2's modified
    DhariwalUNet.forward(..., return_bottleneck=True) returns;
  * the classifier head: DMD2's `cls_pred_branch` layout, with 64 channels
    instead of 768, built with torch.nn layers (PyTorch default init, fixed seed),
    then perturbed as described in README.md;
  * generator loss softplus(-logits_fake).mean() and discriminator loss
    (softplus(logits_fake) + softplus(-logits_real)).mean(), with the images and
    noise levels fixed instead of drawn at random, plus three gradients from
    autograd.

Checks made along the way:
  * the Karras grid equals DMD2's `get_sigmas_karras`, flipped, and the
    `karras_sigmas` stored in reference/dmd/dmd_cases.safetensors;
  * the wrapper's bottleneck equals DMD2's own modified EDMPrecond
    (third_party/edm/training/networks.py of tianweiy/DMD2, called with
    return_bottleneck=True) loaded with the same weights;
  * the logits, losses and gradients equal those from DMD2's own
    `EDMGuidance.compute_generator_clean_cls_loss` and
    `compute_guidance_clean_cls_loss` (main/edm/edm_guidance.py). For this
    check torch.randint and torch.randn_like are temporarily replaced so that
    they return the fixed indices and noise;
  * everything is recomputed in float64 from the same stored float32 inputs and
    weights, and the relative L2 ||f32 - f64|| / ||f64|| is reported.
"""

import argparse
import contextlib
import importlib
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import training.networks as N  # official EDM (PYTHONPATH=/tmp/edm)

torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))

HERE = os.path.dirname(os.path.abspath(__file__))

NUM_TRAIN_TIMESTEPS = 1000
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
SIGMA_DATA = 0.5
DIFFUSION_GAN_MAX_TIMESTEP = 1000  # as in DMD2's ImageNet GAN experiment scripts

FAKE_SIGMA_INDEX = [0, 250, 600, 999]
REAL_SIGMA_INDEX = [10, 400, 800, 990]
B, C_IMG, RES, LABEL_DIM = 4, 3, 16, 10
INPUT_SEED = 2024
HEAD_SEED = 77
HEAD_CHANNELS = 64

# Head perturbation (see README.md):
GN_AFFINE_STD = 0.1   # GroupNorm weight = 1 + 0.1 * randn, bias = 0.1 * randn
CONV3_SCALE = 0.02    # cls_pred_branch.3.{weight,bias} *= 0.02
CONV6_SCALE = 4.0     # cls_pred_branch.6.weight *= 4
CONV6_BIAS = 0.3      # cls_pred_branch.6.bias = 0.3

ENC_CONV_KEY = 'model.enc.16x16_conv.weight'

# ----------------------------------------------------------------------------


def default_shared():
    for p in ['/work/shared', os.path.join(HERE, '..', '..', '..', '..', 'shared')]:
        if os.path.isdir(os.path.join(p, 'reference')):
            return os.path.abspath(p)
    return '/work/shared'


def karras_grid(n=NUM_TRAIN_TIMESTEPS, dtype=torch.float32):
    """Karras sigmas, ascending (index 0 = sigma_min), computed in float32 like DMD2."""
    t = torch.linspace(0, 1, n, dtype=dtype)
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    return torch.flip((hi + t * (lo - hi)) ** RHO, dims=[0])


def load_net_kwargs(shared):
    with open(os.path.join(shared, 'reference', 'edm', 'adm_tiny.json')) as f:
        kw = json.load(f)
    if kw.get('sigma_max') is None:
        kw['sigma_max'] = float('inf')
    return kw


def build_fake_net(module, kw, state):
    net = module.EDMPrecond(**kw)
    net.load_state_dict(state, strict=True)
    assert net.model.map_augment is None  # DMD2 removes map_augment; adm_tiny has none
    net.eval()  # dropout = 0 and label_dropout = 0, so train() would give the same values
    return net


def make_head(channels=HEAD_CHANNELS):
    """DMD2's cls_pred_branch layout: torch.nn layers, PyTorch default init, then perturbed."""
    torch.manual_seed(HEAD_SEED)
    head = torch.nn.Sequential(
        torch.nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1),  # 8x8 -> 4x4
        torch.nn.GroupNorm(32, channels),
        torch.nn.SiLU(),
        torch.nn.Conv2d(channels, channels, kernel_size=4, stride=4, padding=0),  # 4x4 -> 1x1
        torch.nn.GroupNorm(32, channels),
        torch.nn.SiLU(),
        torch.nn.Conv2d(channels, 1, kernel_size=1, stride=1, padding=0),
    )
    g = torch.Generator().manual_seed(HEAD_SEED + 1)
    with torch.no_grad():
        for i in (1, 4):
            head[i].weight.copy_(1 + GN_AFFINE_STD * torch.randn(channels, generator=g))
            head[i].bias.copy_(GN_AFFINE_STD * torch.randn(channels, generator=g))
        head[3].weight.mul_(CONV3_SCALE)
        head[3].bias.mul_(CONV3_SCALE)
        head[6].weight.mul_(CONV6_SCALE)
        head[6].bias.fill_(CONV6_BIAS)
    return head


def head_state(head):
    return {f'cls_pred_branch.{k}': v.detach().to(torch.float32).contiguous().clone()
            for k, v in head.state_dict().items()}


# ----------------------------------------------------------------------------
# The bottleneck wrapper (own code, reuses the official EDM module objects).


def bottleneck(net, x, sigma, labels):
    """Activations of net.model (DhariwalUNet) right after its encoder.

    In float32 this follows EDMPrecond.forward: x, sigma and labels are cast to
    float32 first. A float64 network is run in float64 throughout."""
    dtype = next(net.parameters()).dtype
    x = x.to(dtype)
    sigma = sigma.to(dtype).reshape(-1, 1, 1, 1)
    labels = labels.to(dtype).reshape(-1, net.label_dim)
    c_in = 1 / (net.sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    m = net.model
    emb = m.map_noise(c_noise.flatten())
    emb = N.silu(m.map_layer0(emb))
    emb = m.map_layer1(emb)
    emb = emb + m.map_label(labels)
    emb = N.silu(emb)
    h = c_in * x
    for block in m.enc.values():
        h = block(h, emb) if isinstance(block, N.UNetBlock) else block(h)
    return h


def cls_logits(net, head, image, sigma, noise, labels):
    """DMD2's compute_cls_logits with the draws fixed: image + sigma * noise -> bottleneck -> head."""
    noisy = image + sigma.reshape(-1, 1, 1, 1) * noise
    rep = bottleneck(net, noisy, sigma, labels)
    return head(rep).squeeze(dim=[2, 3]), rep


# ----------------------------------------------------------------------------
# float64 helpers: EDM's AttentionOp and PositionalEmbedding work in float32.


class _PlainAttention:
    @staticmethod
    def apply(q, k):
        return torch.einsum('ncq,nck->nqk', q, k / np.sqrt(k.shape[1])).softmax(dim=2)


def _positional64(self, x):
    half = self.num_channels // 2
    f = torch.arange(half, dtype=x.dtype, device=x.device) / (half - (1 if self.endpoint else 0))
    f = (1 / self.max_positions) ** f
    x = x.ger(f)
    return torch.cat([x.cos(), x.sin()], dim=1)


@contextlib.contextmanager
def float64_mode():
    saved = N.AttentionOp, N.PositionalEmbedding.forward
    N.AttentionOp, N.PositionalEmbedding.forward = _PlainAttention, _positional64
    try:
        yield
    finally:
        N.AttentionOp, N.PositionalEmbedding.forward = saved


# ----------------------------------------------------------------------------


def compute_all(net, head, inp):
    """All outputs for one network/head pair (float32 or float64)."""
    dtype = next(net.parameters()).dtype
    t = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inp.items()}
    out = {}

    # Generator turn: gradient flows into fake_image.
    fake_image = t['fake_image'].clone().requires_grad_(True)
    logits_fake_g, rep = cls_logits(net, head, fake_image, t['fake_sigma'], t['fake_noise'], t['labels'])
    gen_loss = F.softplus(-logits_fake_g).mean()
    (g_img,) = torch.autograd.grad(gen_loss, fake_image)

    # Guidance turn: images detached; gradients flow into the head and the fake network.
    logits_real, _ = cls_logits(net, head, t['real_image'].detach(), t['real_sigma'], t['real_noise'], t['labels'])
    logits_fake, _ = cls_logits(net, head, t['fake_image'].detach(), t['fake_sigma'], t['fake_noise'], t['labels'])
    guid_loss = (F.softplus(logits_fake) + F.softplus(-logits_real)).mean()
    enc_w = net.model.enc['16x16_conv'].weight
    g_head0, g_enc = torch.autograd.grad(guid_loss, [head[0].weight, enc_w])

    assert torch.equal(logits_fake, logits_fake_g)
    out['fake_bottleneck'] = rep.detach()
    out['logits_fake'] = logits_fake.detach()
    out['logits_real'] = logits_real.detach()
    out['gen_cls_loss'] = gen_loss.detach().reshape(1)
    out['guidance_cls_loss'] = guid_loss.detach().reshape(1)
    out['grad_fake_image_of_gen_loss'] = g_img
    out['grad_head0_weight_of_guidance_loss'] = g_head0
    out['grad_fake_enc_conv_weight_of_guidance_loss'] = g_enc
    return out


# ----------------------------------------------------------------------------
# Cross-checks against DMD2's own code.


def import_dmd2(dmd2_root):
    if dmd2_root not in sys.path:
        sys.path.append(dmd2_root)  # after /tmp/edm: torch_utils/dnnlib resolve to EDM's (identical copies)
    dnet = importlib.import_module('third_party.edm.training.networks')
    guid = importlib.import_module('main.edm.edm_guidance')
    return dnet, guid


@contextlib.contextmanager
def fixed_draws(index_queue, noise_queue):
    """Make torch.randint / torch.randn_like return the given tensors, in order."""
    orig_randint, orig_randn_like = torch.randint, torch.randn_like

    def fake_randint(low, high, size, **kw):
        idx = index_queue.pop(0)
        assert low == 0 and high == DIFFUSION_GAN_MAX_TIMESTEP and list(size) == list(idx.shape)
        assert int(idx.min()) >= low and int(idx.max()) < high
        return idx.clone()

    def fake_randn_like(x, **kw):
        n = noise_queue.pop(0)
        assert n.shape == x.shape
        return n.clone().to(x.dtype)

    torch.randint, torch.randn_like = fake_randint, fake_randn_like
    try:
        yield
    finally:
        torch.randint, torch.randn_like = orig_randint, orig_randn_like
    assert not index_queue and not noise_queue


def check_against_dmd2(dmd2_root, kw, state, head_sd, inp, ours):
    dnet_mod, guid_mod = import_dmd2(dmd2_root)
    res = {}

    # Karras grid.
    dmd2_grid = torch.flip(guid_mod.get_sigmas_karras(NUM_TRAIN_TIMESTEPS, sigma_min=SIGMA_MIN,
                                                      sigma_max=SIGMA_MAX, rho=RHO), dims=[0])
    res['karras_grid_equals_dmd2'] = bool(torch.equal(dmd2_grid, karras_grid()))

    # Bottleneck: DMD2's modified EDMPrecond(..., return_bottleneck=True).
    dnet = build_fake_net(dnet_mod, kw, state)
    with torch.no_grad():
        noisy = inp['fake_image'] + inp['fake_sigma'].reshape(-1, 1, 1, 1) * inp['fake_noise']
        rep = dnet(noisy, inp['fake_sigma'], inp['labels'], return_bottleneck=True).float()
    res['bottleneck_max_abs_diff_vs_dmd2'] = (rep - ours['fake_bottleneck']).abs().max().item()

    # Losses and gradients through DMD2's EDMGuidance methods (constructor bypassed:
    # it loads an EDM pickle; the attributes the methods use are set here).
    g = guid_mod.EDMGuidance.__new__(guid_mod.EDMGuidance)
    torch.nn.Module.__init__(g)
    g.fake_unet = dnet.requires_grad_(True)
    head = make_head()
    head.load_state_dict({k[len('cls_pred_branch.'):]: v for k, v in head_sd.items()})
    g.cls_pred_branch = head
    g.diffusion_gan = True
    g.diffusion_gan_max_timestep = DIFFUSION_GAN_MAX_TIMESTEP
    g.register_buffer('karras_sigmas', dmd2_grid)

    fake_image = inp['fake_image'].clone().requires_grad_(True)
    with fixed_draws([inp['fake_sigma_index']], [inp['fake_noise']]):
        gen_loss = g.compute_generator_clean_cls_loss(fake_image, inp['labels'])['gen_cls_loss']
    (g_img,) = torch.autograd.grad(gen_loss, fake_image)

    # compute_guidance_clean_cls_loss evaluates the real batch first, then the fake batch.
    with fixed_draws([inp['real_sigma_index'], inp['fake_sigma_index']], [inp['real_noise'], inp['fake_noise']]):
        loss_dict, log_dict = g.compute_guidance_clean_cls_loss(
            real_image=inp['real_image'], fake_image=inp['fake_image'],
            real_label=inp['labels'], fake_label=inp['labels'])
    guid_loss = loss_dict['guidance_cls_loss']
    g_head0, g_enc = torch.autograd.grad(guid_loss, [head[0].weight, dnet.model.enc['16x16_conv'].weight])

    theirs = {
        'gen_cls_loss': gen_loss.detach().reshape(1),
        'guidance_cls_loss': guid_loss.detach().reshape(1),
        'sigmoid_logits_real': log_dict['pred_realism_on_real'],
        'sigmoid_logits_fake': log_dict['pred_realism_on_fake'],
        'grad_fake_image_of_gen_loss': g_img,
        'grad_head0_weight_of_guidance_loss': g_head0,
        'grad_fake_enc_conv_weight_of_guidance_loss': g_enc,
    }
    mine = dict(ours)
    mine['sigmoid_logits_real'] = torch.sigmoid(ours['logits_real']).squeeze(1)
    mine['sigmoid_logits_fake'] = torch.sigmoid(ours['logits_fake']).squeeze(1)
    res['max_abs_diff_vs_dmd2_edm_guidance'] = {k: (v - mine[k]).abs().max().item() for k, v in theirs.items()}
    return res


# ----------------------------------------------------------------------------


def head_sensitivity(head, out):
    """How far the fake logits move under likely porting mistakes (relative L2), for the README."""
    rep = out['fake_bottleneck']
    ref = out['logits_fake']

    def run(gn):
        h = rep
        for i, layer in enumerate(head):
            h = gn(layer, h) if i in (1, 4) else layer(h)
        return h.squeeze(dim=[2, 3])

    with torch.no_grad():
        variants = {
            'groupnorm_eps_1e-6': run(lambda l, h: F.group_norm(h, 32, l.weight, l.bias, 1e-6)),
            'groupnorm_16_groups_like_edm_min_4_channels': run(lambda l, h: F.group_norm(h, 16, l.weight, l.bias, l.eps)),
            'groupnorm_without_affine': run(lambda l, h: F.group_norm(h, 32, None, None, l.eps)),
        }
    return {k: rel_l2(v, ref) for k, v in variants.items()}


def rel_l2(a, b):
    a, b = a.to(torch.float64), b.to(torch.float64)
    return ((a - b).norm() / b.norm()).item()


def make_inputs(grid):
    g = torch.Generator().manual_seed(INPUT_SEED)
    fake_image = (0.6 * torch.randn([B, C_IMG, RES, RES], generator=g)).clamp(-1, 1)
    real_image = torch.rand([B, C_IMG, RES, RES], generator=g) * 2 - 1
    classes = torch.randint(0, LABEL_DIM, [B], generator=g)
    labels = F.one_hot(classes, LABEL_DIM).to(torch.float32)
    fake_noise = torch.randn([B, C_IMG, RES, RES], generator=g)
    real_noise = torch.randn([B, C_IMG, RES, RES], generator=g)
    fi = torch.tensor(FAKE_SIGMA_INDEX, dtype=torch.int64)
    ri = torch.tensor(REAL_SIGMA_INDEX, dtype=torch.int64)
    return {
        'fake_image': fake_image, 'real_image': real_image, 'labels': labels,
        'fake_sigma_index': fi, 'real_sigma_index': ri,
        'fake_sigma': grid[fi], 'real_sigma': grid[ri],
        'fake_noise': fake_noise, 'real_noise': real_noise,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default=HERE)
    ap.add_argument('--shared', default=default_shared())
    ap.add_argument('--dmd2', default='/tmp/dmd2')
    ap.add_argument('--report', default=None)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    report = {'torch': torch.__version__, 'python': sys.version.split()[0]}

    grid = karras_grid()
    ref_grid = load_file(os.path.join(args.shared, 'reference', 'dmd', 'dmd_cases.safetensors'))['karras_sigmas']
    report['karras_grid_equals_dmd_cases'] = bool(torch.equal(ref_grid, grid))

    kw = load_net_kwargs(args.shared)
    state = load_file(os.path.join(args.shared, 'reference', 'dmd', 'adm_tiny_fake.safetensors'))
    inp = make_inputs(grid)

    net = build_fake_net(N, kw, state)
    head = make_head()
    head_sd = head_state(head)
    out = compute_all(net, head, inp)

    for k, v in out.items():
        assert torch.isfinite(v).all(), k
        assert v.dtype == torch.float32, k
    save_file(head_sd, os.path.join(args.out, 'head.safetensors'))
    cases = dict(inp)
    cases.update(out)
    save_file({k: v.contiguous() for k, v in cases.items()}, os.path.join(args.out, 'gan_cases.safetensors'))

    # float64 recomputation from the stored float32 values.
    net64 = build_fake_net(N, kw, state).double()
    head64 = make_head()
    head64.load_state_dict({k[len('cls_pred_branch.'):]: v for k, v in head_sd.items()})
    head64 = head64.double()
    with float64_mode():
        out64 = compute_all(net64, head64, inp)
    report['rel_l2_f32_vs_f64'] = {k: rel_l2(out[k], out64[k]) for k in out}
    report['max_abs_diff_f32_vs_f64'] = {k: (out[k].double() - out64[k]).abs().max().item() for k in out}
    report['logits_rel_err_per_sample'] = {
        k: ((out[k].double() - out64[k]).abs() / out64[k].abs()).flatten().tolist() for k in ('logits_fake', 'logits_real')}

    report.update(check_against_dmd2(args.dmd2, kw, state, head_sd, inp, out))

    # Some magnitudes, for the README.
    with torch.no_grad():
        rep = out['fake_bottleneck']
        h3 = head[3](head[2](head[1](head[0](rep))))
        half_diff = (h3.reshape(B, 32, 2)[..., 0] - h3.reshape(B, 32, 2)[..., 1]).abs() / 2
    report['stats'] = {
        'fake_sigma': inp['fake_sigma'].tolist(), 'real_sigma': inp['real_sigma'].tolist(),
        'labels': inp['labels'].argmax(1).tolist(),
        'logits_fake': out['logits_fake'].flatten().tolist(), 'logits_real': out['logits_real'].flatten().tolist(),
        'gen_cls_loss': out['gen_cls_loss'].item(), 'guidance_cls_loss': out['guidance_cls_loss'].item(),
        'bottleneck_std_per_sample': rep.flatten(1).std(1).tolist(),
        'gn2_half_pair_diff_median_min_max': [half_diff.median().item(), half_diff.min().item(), half_diff.max().item()],
        'grad_norms': {k: out[k].norm().item() for k in out if k.startswith('grad_')},
        'bytes': {f: os.path.getsize(os.path.join(args.out, f)) for f in ('head.safetensors', 'gan_cases.safetensors')},
    }
    report['sensitivity'] = head_sensitivity(head, out)
    print(json.dumps(report, indent=2))
    if args.report:
        with open(args.report, 'w') as f:
            json.dump(report, f, indent=2)


if __name__ == '__main__':
    main()
