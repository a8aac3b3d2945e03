#!/usr/bin/env python3
"""Regenerate the extra EDM reference cases in this folder.

Runs the OFFICIAL EDM networks (NVlabs/edm, training/networks.py) on CPU in
float32.  EDM itself is not part of this repository; put a checkout of it on
PYTHONPATH.  Exact command used (from the repository root):

    mkdir -p /tmp/edm && git --git-dir=/work/.mirror/NVlabs+edm/repo archive HEAD | tar -x -C /tmp/edm
    pip install torch safetensors numpy    # (click, tqdm, pillow: optional, only to import
                                           #  EDM's generate.py for a cross-check)
    PYTHONPATH=/tmp/edm python tests/data/edm_extra/make_cases.py

Options: `--out DIR` (default: the folder of this script), `--report FILE`
(write the float32-vs-float64 table as JSON).

What it does, per case NAME (see README.md for the tensor list):
  * builds `EDMPrecond(**kwargs)` (kwargs saved as NAME.json; sigma_max = inf is
    written as null), overwrites every *parameter* with random values (buffers
    such as `resample_filter` and Fourier `freqs` are left as EDM makes them),
    and saves `state_dict()` as NAME.safetensors;
  * evaluates the denoiser D(x; sigma, labels) on 4 inputs and runs the
    deterministic branch of EDM's `edm_sampler` (generate.py, S_churn = 0,
    18 steps, Heun) plus the same loop without the 2nd-order correction (Euler),
    all with the network in eval mode under torch.no_grad(), float32 network,
    float64 state between network calls (as EDM does);
  * repeats the same computations in float64 (network converted with .double(),
    EDMPrecond's float32 casts and AttentionOp's float32 upcast bypassed,
    positional frequencies computed in float64) and reports the relative L2
    ||f32 - f64|| / ||f64||.

The sampler loop is written here following EDM's algorithm; when EDM's
generate.py can be imported the script checks that EDM's own `edm_sampler`
(S_churn = 0) gives bit-identical `sample_out`.  The loss case uses EDM's own
`training.loss.EDMLoss` with its two random draws replaced by fixed tensors and
checks that against an explicit evaluation of the formula.
"""

import argparse
import contextlib
import json
import math
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

import training.networks as N
import training.loss as L

torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))

SIGMA_DATA = 0.5
DENOISE_SIGMA = [0.002, 0.3, 2.5, 80.0]

# ----------------------------------------------------------------------------
# Case definitions: EDMPrecond keyword arguments (what NAME.json holds).

def precond_kwargs(img_resolution, img_channels, label_dim, model_type, **model_kwargs):
    return dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                sigma_min=0.0, sigma_max=None, sigma_data=SIGMA_DATA, model_type=model_type, **model_kwargs)

CASES = {
    # Requested: model_channels 64, channel_mult [1,2], num_blocks 1, attn [16,8] -> 12 MB of weights.
    # num_blocks 0 keeps 1-head attention at 16x16 (64 ch), 1 head at 8x8 (dec in0, 64 ch) and
    # 2 heads at 8x8 (dec 8x8_block0, 128 ch) at 4.9 MB.
    'adm_uncond_heads': precond_kwargs(16, 3, 0, 'DhariwalUNet',
        model_channels=64, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=0,
        attn_resolutions=[16, 8], dropout=0.0),
    # Requested model_channels 64 (18.6 MB); 32 keeps the structure at 4.7 MB.  Channels 32/64/32:
    # 1-head attention at 4x4 (64 ch); dec 2x2_in0 has attention=True but 32 // 64 = 0 heads.
    'adm_gray_aug': precond_kwargs(8, 1, 3, 'DhariwalUNet',
        augment_dim=9, model_channels=32, channel_mult=[1, 2, 1], channel_mult_emb=2, num_blocks=2,
        attn_resolutions=[4], dropout=0.0),
    'ncsnpp_tiny': precond_kwargs(16, 3, 5, 'SongUNet',
        model_channels=16, channel_mult=[1, 2, 2], channel_mult_emb=2, num_blocks=1,
        attn_resolutions=[8], dropout=0.0, embedding_type='fourier', channel_mult_noise=2,
        encoder_type='residual', decoder_type='skip', resample_filter=[1, 3, 3, 1]),
    'songunet_skip_enc': precond_kwargs(16, 3, 0, 'SongUNet',
        model_channels=16, channel_mult=[1, 2, 2], channel_mult_emb=2, num_blocks=2,
        attn_resolutions=[4], dropout=0.0, embedding_type='positional', channel_mult_noise=1,
        encoder_type='skip', decoder_type='standard', resample_filter=[1, 1]),
    'songunet_skip_both': precond_kwargs(16, 3, 4, 'SongUNet',
        model_channels=16, channel_mult=[1, 2, 2], channel_mult_emb=2, num_blocks=2,
        attn_resolutions=[8], dropout=0.0, embedding_type='positional', channel_mult_noise=1,
        encoder_type='skip', decoder_type='skip', resample_filter=[1, 3, 3, 1]),
}
SEEDS = {name: 1000 + 17 * i for i, name in enumerate(CASES)}
LOSS_CASE = 'adm_uncond_heads'
LOSS_SEED = 4242

# ----------------------------------------------------------------------------
# Network construction with every parameter random (nothing zero).

def build_net(kwargs, seed):
    kw = dict(kwargs)
    if kw['sigma_max'] is None:
        kw['sigma_max'] = float('inf')
    torch.manual_seed(seed)  # EDM's own init (and FourierEmbedding.freqs) draw from the global RNG
    net = N.EDMPrecond(**kw)
    gen = torch.Generator().manual_seed(seed + 1)
    gn_params = set()
    for m in net.modules():
        if isinstance(m, N.GroupNorm):
            gn_params.add(id(m.weight))
            gn_params.add(id(m.bias))
    with torch.no_grad():
        for name, p in net.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if id(p) in gn_params:
                p.copy_((1.0 + 0.1 * r) if name.endswith('weight') else 0.1 * r)
            elif p.dim() >= 2:
                p.copy_(r / math.sqrt(int(np.prod(p.shape[1:]))))
            else:
                p.copy_(0.1 * r)
    net.eval().requires_grad_(False)
    return net

# ----------------------------------------------------------------------------
# float64 evaluation of the same network (EDMPrecond casts to float32 and
# AttentionOp upcasts to float32, so both are bypassed here).

class _Attention64:
    @staticmethod
    def apply(q, k):
        return torch.einsum('ncq,nck->nqk', q, k / np.sqrt(k.shape[1])).softmax(dim=2)

def _positional_forward64(self, x):
    freqs = torch.arange(start=0, end=self.num_channels // 2, dtype=x.dtype, device=x.device)
    freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
    freqs = (1 / self.max_positions) ** freqs
    x = x.ger(freqs)
    return torch.cat([x.cos(), x.sin()], dim=1)

@contextlib.contextmanager
def float64_patches():
    old_attn, old_pos = N.AttentionOp, N.PositionalEmbedding.forward
    N.AttentionOp, N.PositionalEmbedding.forward = _Attention64, _positional_forward64
    try:
        yield
    finally:
        N.AttentionOp, N.PositionalEmbedding.forward = old_attn, old_pos

def denoise64(net64, x, sigma, class_labels=None):
    """EDMPrecond.forward without the float32 casts (call inside float64_patches)."""
    x = x.to(torch.float64)
    sigma = torch.as_tensor(sigma).to(torch.float64).reshape(-1, 1, 1, 1)
    class_labels = None if net64.label_dim == 0 else class_labels.to(torch.float64).reshape(-1, net64.label_dim)
    sd = net64.sigma_data
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    F_x = net64.model(c_in * x, c_noise.flatten(), class_labels=class_labels)
    assert F_x.dtype == torch.float64
    return c_skip * x + c_out * F_x

# ----------------------------------------------------------------------------
# Deterministic EDM sampler (generate.py edm_sampler with S_churn = 0).

def edm_t_steps(net, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7):
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    step_indices = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])

def deterministic_sampler(denoise, net, latents, class_labels, heun=True, num_steps=18):
    """denoise(x, t, labels) -> tensor.  With heun=True this is EDM's edm_sampler for
    S_churn = 0 (gamma = 0, so t_hat = t_cur and x_hat = x_cur); heun=False drops the
    2nd-order correction (plain Euler, num_steps network evaluations)."""
    t_steps = edm_t_steps(net, num_steps)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_hat, t_hat = x_next, t_cur
        denoised = denoise(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if heun and i < num_steps - 1:
            denoised = denoise(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

def try_import_edm_sampler():
    try:
        import generate
        return generate.edm_sampler
    except Exception as e:  # generate.py needs click/tqdm/PIL
        print(f'  (EDM generate.py not importable: {e!r}; skipping edm_sampler cross-check)')
        return None

# ----------------------------------------------------------------------------

def rel_l2(a, b):
    a, b = a.to(torch.float64), b.to(torch.float64)
    return ((a - b).norm() / b.norm()).item()

def one_hot(classes, dim):
    return torch.nn.functional.one_hot(torch.as_tensor(classes), dim).to(torch.float32)

def check_finite(name, t):
    assert torch.isfinite(t).all(), f'{name}: non-finite values'

def make_case(name, kwargs, out_dir, edm_sampler):
    seed = SEEDS[name]
    net = build_net(kwargs, seed)
    C, R, Ldim = kwargs['img_channels'], kwargs['img_resolution'], kwargs['label_dim']

    with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
        json.dump(kwargs, f, indent=2)
        f.write('\n')
    sd = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in net.state_dict().items()}
    save_file(sd, os.path.join(out_dir, f'{name}.safetensors'))

    g = torch.Generator().manual_seed(seed + 2)
    sigma = torch.tensor(DENOISE_SIGMA, dtype=torch.float32)
    x = (SIGMA_DATA * torch.randn([4, C, R, R], generator=g)
         + sigma.reshape(-1, 1, 1, 1) * torch.randn([4, C, R, R], generator=g)).to(torch.float32)
    labels = one_hot(torch.randint(0, Ldim, [4], generator=g), Ldim) if Ldim else None
    latents = torch.randn([2, C, R, R], generator=g)
    s_labels = one_hot(torch.randint(0, Ldim, [2], generator=g), Ldim) if Ldim else None

    cases = {}
    stats = {}
    with torch.no_grad():
        out = net(x, sigma, labels)
        t_steps = edm_t_steps(net)
        denoise32 = lambda xx, tt, ll: net(xx, tt, ll)
        sample = deterministic_sampler(denoise32, net, latents, s_labels, heun=True).to(torch.float32)
        euler = deterministic_sampler(denoise32, net, latents, s_labels, heun=False).to(torch.float32)
        if edm_sampler is not None:
            ref = edm_sampler(net, latents, s_labels, S_churn=0).to(torch.float32)
            assert torch.equal(ref, sample), f'{name}: own loop differs from EDM edm_sampler'
            stats['edm_sampler_bit_identical'] = True

        aug_labels = aug_out = None
        if kwargs.get('augment_dim', 0):
            aug_labels = 0.5 * torch.randn([4, kwargs['augment_dim']], generator=g)
            aug_out = net(x, sigma, labels, augment_labels=aug_labels)

        # float64 computation of the same thing
        net64 = build_net(kwargs, seed).double()
        with float64_patches():
            out64 = denoise64(net64, x, sigma, labels)
            d64 = lambda xx, tt, ll: denoise64(net64, xx, tt, ll)
            sample64 = deterministic_sampler(d64, net64, latents, s_labels, heun=True)
            euler64 = deterministic_sampler(d64, net64, latents, s_labels, heun=False)
            if aug_labels is not None:
                x64 = x.double(); s64 = sigma.double().reshape(-1, 1, 1, 1)
                c_in = 1 / (SIGMA_DATA ** 2 + s64 ** 2).sqrt()
                F = net64.model(c_in * x64, (s64.log() / 4).flatten(), class_labels=labels.double(),
                                augment_labels=aug_labels.double())
                aug64 = SIGMA_DATA ** 2 / (s64 ** 2 + SIGMA_DATA ** 2) * x64 + s64 * SIGMA_DATA / (s64 ** 2 + SIGMA_DATA ** 2).sqrt() * F

    cases['denoise_x'] = x
    cases['denoise_sigma'] = sigma
    if Ldim:
        cases['denoise_labels'] = labels
    cases['denoise_out'] = out
    cases['sample_latents'] = latents
    if Ldim:
        cases['sample_labels'] = s_labels
    cases['sample_t_steps'] = t_steps
    cases['sample_out'] = sample
    cases['euler_out'] = euler
    if aug_labels is not None:
        cases['denoise_augment_labels'] = aug_labels
        cases['denoise_augment_out'] = aug_out
    for k, v in cases.items():
        check_finite(f'{name}.{k}', v)
    save_file({k: v.contiguous() for k, v in cases.items()}, os.path.join(out_dir, f'{name}_cases.safetensors'))

    # magnitude of the raw network output F at each sigma (should be O(1))
    with torch.no_grad():
        s4 = sigma.reshape(-1, 1, 1, 1)
        F = (out - SIGMA_DATA ** 2 / (s4 ** 2 + SIGMA_DATA ** 2) * x) / (s4 * SIGMA_DATA / (s4 ** 2 + SIGMA_DATA ** 2).sqrt())
    stats.update({
        'denoise_out': rel_l2(out, out64),
        'sample_out': rel_l2(sample, sample64),
        'euler_out': rel_l2(euler, euler64),
        'F_std_per_sigma': [round(v, 4) for v in F.flatten(1).std(1).tolist()],
        'denoise_out_std': [round(v, 4) for v in out.flatten(1).std(1).tolist()],
        'sample_out_std': [round(v, 4) for v in sample.flatten(1).std(1).tolist()],
        'euler_out_std': [round(v, 4) for v in euler.flatten(1).std(1).tolist()],
    })
    if aug_labels is not None:
        stats['denoise_augment_out'] = rel_l2(aug_out, aug64)
        stats['augment_changes_output_by'] = rel_l2(aug_out, out)
    stats['heads'] = {n: m.num_heads for n, m in net.model.named_modules() if isinstance(m, N.UNetBlock) and m.num_heads}
    stats['bytes'] = os.path.getsize(os.path.join(out_dir, f'{name}.safetensors'))
    return net, stats

def make_loss_case(name, kwargs, out_dir):
    net = build_net(kwargs, SEEDS[name])
    C, R = kwargs['img_channels'], kwargs['img_resolution']
    g = torch.Generator().manual_seed(LOSS_SEED)
    y = torch.rand([4, C, R, R], generator=g) * 2 - 1
    noise = torch.randn([4, C, R, R], generator=g)
    loss_fn = L.EDMLoss(sigma_data=SIGMA_DATA)
    # EDMLoss draws sigma = exp(rnd_normal * P_std + P_mean); pick rnd_normal so that sigma is
    # (to float32 rounding) 0.01, 0.4, 1.7, 30, and store sigma exactly as EDMLoss computes it.
    target = torch.tensor([0.01, 0.4, 1.7, 30.0], dtype=torch.float64)
    rnd_normal = ((target.log() - loss_fn.P_mean) / loss_fn.P_std).to(torch.float32).reshape(4, 1, 1, 1)
    sigma = (rnd_normal * loss_fn.P_std + loss_fn.P_mean).exp()

    orig_randn, orig_randn_like = torch.randn, torch.randn_like
    def fake_randn(*a, **k):
        return rnd_normal.clone()
    def fake_randn_like(t, *a, **k):
        assert t.shape == noise.shape
        return noise.clone()
    with torch.no_grad():
        torch.randn, torch.randn_like = fake_randn, fake_randn_like
        try:
            loss_edm = loss_fn(net, y, labels=None, augment_pipe=None)
        finally:
            torch.randn, torch.randn_like = orig_randn, orig_randn_like
        # explicit formula, same op order
        weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
        D = net(y + noise * sigma, sigma, None)
        loss = weight * ((D - y) ** 2)
        assert torch.equal(loss, loss_edm), 'explicit loss differs from EDMLoss'

        net64 = build_net(kwargs, SEEDS[name]).double()
        with float64_patches():
            s64, y64 = sigma.double(), y.double()
            w64 = (s64 ** 2 + SIGMA_DATA ** 2) / (s64 * SIGMA_DATA) ** 2
            D64 = denoise64(net64, y64 + noise.double() * s64, s64, None)
            loss64 = w64 * ((D64 - y64) ** 2)
    check_finite('loss', loss)
    save_file({'y': y.contiguous(), 'sigma': sigma.flatten().contiguous(), 'noise': noise.contiguous(),
               'loss': loss.contiguous()}, os.path.join(out_dir, 'edm_loss_cases.safetensors'))
    return {'loss': rel_l2(loss, loss64), 'loss_mean_per_sample': [round(v, 4) for v in loss.flatten(1).mean(1).tolist()],
            'sigma': sigma.flatten().tolist()}

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument('--report', default=None)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    edm_sampler = try_import_edm_sampler()
    report = {'torch': torch.__version__}
    for name, kwargs in CASES.items():
        print(f'{name} ...', flush=True)
        _, stats = make_case(name, kwargs, args.out, edm_sampler)
        report[name] = stats
        print('  ' + json.dumps(stats), flush=True)
    print('edm_loss_cases ...', flush=True)
    report['edm_loss_cases'] = make_loss_case(LOSS_CASE, CASES[LOSS_CASE], args.out)
    print('  ' + json.dumps(report['edm_loss_cases']), flush=True)
    if args.report:
        with open(args.report, 'w') as f:
            json.dump(report, f, indent=2)

if __name__ == '__main__':
    main()
