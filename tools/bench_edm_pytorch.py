#!/usr/bin/env python3
"""Time the official EDM network in PyTorch eager the way `dmd bench` times dmd-burn's.

Optional and not needed by the project: it lets anyone put a PyTorch number beside
`dmd bench --net-config NET.json --batch B --json OUT.json` on the same machine. It imports
EDM's own `training.networks.EDMPrecond` and `training.loss.EDMLoss` from a checkout of
https://github.com/NVlabs/edm (pass its folder with --edm), builds the network from the same
NET.json (EDMPrecond's keyword arguments; random weights) and reports, each the median of
--iters runs after --warmup untimed ones:

  denoise_fwd_ms   D(x; sigma, labels) on a batch, no autograd
  teacher_step_ms  EDM loss on a batch, backward, Adam step (and the three timed apart,
                   synchronised between them: teacher_step_{forward,backward,update}_ms)
  dmd_step_ms      one DMD iteration as DMD2 runs it: generator forward at sigma 80; real and
                   fake score forward (no autograd) at Karras-grid sigmas from steps [20, 981)
                   of 1000; the normalised distribution-matching loss backward into the
                   generator, gradient clipping at 10, AdamW; then the fake-score denoising
                   loss on the detached images (steps [0, 1000)), backward, clipping, AdamW

    python3 tools/bench_edm_pytorch.py --edm ~/src/edm \
        --net-config experiments/configs/networks/adm_tiny.json --batch 32 \
        --device cpu --threads 2 --json results/bench/pytorch-cpu.json

--bf16 runs the networks under torch.autocast(bfloat16), as DMD2's mixed precision does.
On CUDA the peak allocated GPU memory is reported too.
"""
import argparse
import copy
import json
import platform
import statistics
import sys
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--edm", required=True, help="folder of an NVlabs/edm checkout")
    p.add_argument("--net-config", required=True, help="EDMPrecond kwargs as JSON")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--only", default="fwd,teacher,dmd", help="subset of fwd,teacher,dmd")
    p.add_argument("--ops", action="store_true", help="also time the building blocks alone, as `dmd bench --ops`")
    p.add_argument("--profile", default=None, help="write torch.profiler's kernel table of one teacher step and one DMD iteration (after the timing) to this file")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    import torch
    sys.path.insert(0, a.edm)
    from training.networks import EDMPrecond
    from training.loss import EDMLoss

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    kwargs = json.load(open(a.net_config))
    if kwargs.get("sigma_max") is None:
        kwargs["sigma_max"] = float("inf")
    # EDM's own mixed precision (use_fp16: float16 body on CUDA) is off: float32, or bf16 by
    # autocast with --bf16, as dmd-burn runs it.
    kwargs["use_fp16"] = False
    torch.manual_seed(0)
    net = EDMPrecond(**kwargs).to(dev)
    if a.bf16:
        # EDMPrecond asserts a float32 backbone output; under autocast it is bf16.
        net.model.register_forward_hook(lambda module, inputs, output: output.float())
    res, ch, ncls = kwargs["img_resolution"], kwargs["img_channels"], kwargs.get("label_dim", 0)
    b = a.batch
    x = torch.randn(b, ch, res, res, device=dev)
    sigma = 0.002 * 40000.0 ** (torch.arange(b, device=dev) / max(b, 2))
    labels = torch.eye(ncls, device=dev)[torch.arange(b, device=dev) % ncls] if ncls else None

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16)

    def timed(f):
        for _ in range(a.warmup):
            f()
        sync()
        times = []
        for _ in range(a.iters):
            t = time.perf_counter()
            f()
            sync()
            times.append((time.perf_counter() - t) * 1000.0)
        return statistics.median(times)

    out = {"net_config": a.net_config, "batch": b, "device": a.device, "bf16": a.bf16,
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "warmup": a.warmup, "iters": a.iters}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    only = a.only.split(",")

    if "fwd" in only:
        def forward():
            with torch.no_grad(), autocast():
                net(x, sigma, labels)
        out["denoise_fwd_ms"] = timed(forward)
        out["denoise_images_per_s"] = b / out["denoise_fwd_ms"] * 1000.0

    if "teacher" in only:
        teacher = copy.deepcopy(net).train().requires_grad_(True)
        opt = torch.optim.Adam(teacher.parameters(), lr=1e-4)
        loss_fn = EDMLoss()

        # `mark` is called after the loss forward and after the backward.
        def teacher_step(mark=lambda: None):
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(teacher, x, labels).mean()
            mark()
            loss.backward()
            mark()
            opt.step()
        out["teacher_step_ms"] = timed(teacher_step)

        # The same step in three parts, synchronised between them, as `dmd bench` splits it.
        def teacher_step_parts():
            marks = [time.perf_counter()]
            def mark():
                sync()
                marks.append(time.perf_counter())
            teacher_step(mark)
            mark()
            return [later - earlier for earlier, later in zip(marks, marks[1:])]
        parts = [teacher_step_parts() for _ in range(a.iters)]
        for i, key in enumerate(("forward", "backward", "update")):
            out[f"teacher_step_{key}_ms"] = statistics.median(p[i] for p in parts) * 1000.0
        if a.profile:
            profile(torch, teacher_step, a.profile, "teacher step", "w")
        del teacher, opt

    if "dmd" in only:
        real = copy.deepcopy(net).eval().requires_grad_(False)
        fake = copy.deepcopy(net).train().requires_grad_(True)
        gen = copy.deepcopy(net).train().requires_grad_(True)
        opt_g = torch.optim.AdamW(gen.parameters(), lr=2e-6, weight_decay=0.01)
        opt_f = torch.optim.AdamW(fake.parameters(), lr=2e-6, weight_decay=0.01)
        ramp = torch.linspace(0, 1, 1000, device=dev)
        karras = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
        karras = karras.flip(0)  # index 0 is sigma_min
        z = torch.randn(b, ch, res, res, device=dev)

        def dmd_iteration():
            # Generator update: distribution matching.
            with autocast():
                img = gen(z * 80.0, torch.full((b,), 80.0, device=dev), labels)
            s = karras[torch.randint(20, 981, (b,), device=dev)].reshape(-1, 1, 1, 1)
            x_t = img + s * torch.randn_like(img)
            with torch.no_grad(), autocast():
                p_real = img - real(x_t, s, labels).float()
                p_fake = img - fake(x_t, s, labels).float()
            weight = p_real.abs().mean(dim=[1, 2, 3], keepdim=True)
            grad = torch.nan_to_num((p_real - p_fake) / weight)
            loss = 0.5 * torch.nn.functional.mse_loss(img.float(), (img - grad).detach().float())
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gen.parameters(), 10.0)
            opt_g.step()
            # Fake-score update on the detached images.
            x0 = img.detach().float()
            s = karras[torch.randint(0, 1000, (b,), device=dev)].reshape(-1, 1, 1, 1)
            with autocast():
                pred = fake(x0 + s * torch.randn_like(x0), s, labels).float()
            w = 1 / s ** 2 + 1 / 0.5 ** 2
            loss_f = (w * (pred - x0) ** 2).mean()
            opt_f.zero_grad(set_to_none=True)
            loss_f.backward()
            torch.nn.utils.clip_grad_norm_(fake.parameters(), 10.0)
            opt_f.step()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        out["dmd_step_ms"] = timed(dmd_iteration)
        if dev.type == "cuda":
            out["dmd_peak_gpu_mib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
        if a.profile:
            profile(torch, dmd_iteration, a.profile, "DMD iteration", "a")

    if a.ops:
        out["ops"] = time_ops(torch, kwargs, b, dev, timed)
        for name, v in out["ops"].items():
            print(f"{name:<40} forward {v['forward_ms']:8.2f} ms   forward+backward {v['forward_backward_ms']:8.2f} ms")

    for k in ("denoise_fwd_ms", "teacher_step_ms", "dmd_step_ms"):
        if k in out:
            print(f"{k:>16}: {out[k]:.1f}")
    if "teacher_step_update_ms" in out:
        print("teacher step: loss forward {teacher_step_forward_ms:.1f} ms + backward {teacher_step_backward_ms:.1f} ms, Adam update {teacher_step_update_ms:.1f} ms".format(**out))
    if "dmd_peak_gpu_mib" in out:
        print(f"peak GPU memory (DMD iteration, PyTorch allocator): {out['dmd_peak_gpu_mib']:.0f} MiB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
        print("wrote", a.json)


def profile(torch, step, path, what, mode):
    """Appends torch.profiler's table of `step` (run once, after warm-up) to `path`: the kernels
    and ops by total device time, to set beside `dmd bench`'s CubeCL profile."""
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    with open(path, mode) as f:
        f.write(f"# {what}\n")
        f.write(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90))
        f.write("\n")


def time_ops(torch, kwargs, b, dev, timed):
    """The building blocks of `dmd bench --ops`, same shapes and names."""
    F = torch.nn.functional
    c, r = kwargs.get("model_channels", 128), kwargs["img_resolution"]
    c2, r2 = 2 * c, max(r // 2, 1)
    heads = max(c2 // 64, 1)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.rand(*shape, generator=g) - 0.5).to(dev)

    def attention(qkv):
        n, _, h, w = qkv.shape
        ch = c2 // heads
        q, k, v = qkv.reshape(n * heads, ch, 3, h * w).unbind(2)
        weights = torch.softmax(torch.einsum("ncq,nck->nqk", q, k / ch ** 0.5), dim=2)
        return torch.einsum("nqk,nck->ncq", weights, v).reshape(n, c2, h, w)

    gn_w, gn_b = rand(c) + 1, rand(c)
    cases = [
        (f"conv3x3 {c}->{c} at {r}x{r}", (b, c, r, r), [rand(c, c, 3, 3)], lambda x, w: F.conv2d(x, w, padding=1)),
        (f"conv3x3 {c2}->{c2} at {r2}x{r2}", (b, c2, r2, r2), [rand(c2, c2, 3, 3)], lambda x, w: F.conv2d(x, w, padding=1)),
        (f"conv1x1 {c2}->{3 * c2} at {r2}x{r2} (qkv)", (b, c2, r2, r2), [rand(3 * c2, c2, 1, 1)], lambda x, w: F.conv2d(x, w)),
        (f"group_norm {c} ch at {r}x{r}", (b, c, r, r), [gn_w, gn_b], lambda x, w, bb: F.group_norm(x, min(32, c // 4), w, bb, 1e-5)),
        (f"silu {c} ch at {r}x{r}", (b, c, r, r), [], F.silu),
        # A UNet block's second norm: SiLU of the norm with EDM's adaptive scale and shift.
        (f"group_norm+silu+scale {c} ch at {r}x{r}", (b, c, r, r), [gn_w, gn_b, rand(b, c, 1, 1), rand(b, c, 1, 1)],
         lambda x, w, bb, scale, shift: F.silu(torch.addcmul(shift, F.group_norm(x, min(32, c // 4), w, bb, 1e-5), scale + 1))),
        (f"attention {heads} head(s), {c2} ch at {r2}x{r2}", (b, 3 * c2, r2, r2), [], attention),
        (f"downsample 2x2 average, {c} ch at {r}x{r}", (b, c, r, r), [], lambda x: F.avg_pool2d(x, 2)),
    ]
    out = {}
    for name, shape, params, f in cases:
        x = rand(*shape)

        def fwd():
            with torch.no_grad():
                f(x, *params)
        xg = x.clone().requires_grad_(True)
        pg = [p.clone().requires_grad_(True) for p in params]
        upstream = torch.rand_like(f(x, *params))

        def fwd_bwd():
            (f(xg, *pg) * upstream).sum().backward()
        out[name] = {"forward_ms": timed(fwd), "forward_backward_ms": timed(fwd_bwd)}
    return out


if __name__ == "__main__":
    main()
