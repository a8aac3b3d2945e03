#!/usr/bin/env python3
"""Convert an EDM network pickle (or a PyTorch state_dict) into what dmd-burn reads:
NET.safetensors (the state_dict under EDM's own parameter names, float32) and NET.json
(EDMPrecond's constructor keyword arguments).

This is the only Python a dmd-burn user needs, and only for this step.

    # An official EDM pickle (needs the EDM repository on PYTHONPATH: it holds the classes
    # the pickle refers to), e.g. edm-imagenet-64x64-cond-adm.pkl:
    git clone https://github.com/NVlabs/edm && pip install torch safetensors
    PYTHONPATH=edm python tools/edm_to_safetensors.py edm-imagenet-64x64-cond-adm.pkl out/imagenet64

    # A bare state_dict (.pt/.pth/.bin) of an EDMPrecond, with its kwargs as JSON:
    python tools/edm_to_safetensors.py model.pt out/net --kwargs kwargs.json

Writes out/imagenet64.safetensors and out/imagenet64.json. By default the pickle's `ema`
network is exported (`--key` picks another entry). Only EDMPrecond networks are supported.
"""

import argparse
import json
import math
import os
import pickle
import sys


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def jsonable(value):
    """init_kwargs to JSON: infinity becomes null (dmd-burn reads null as unbounded)."""
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if hasattr(value, "item"):  # numpy / torch scalars
        return jsonable(value.item())
    return value


def load_pickle(path, key):
    try:
        import dnnlib  # noqa: F401  (EDM's; the pickle's classes live in its repository)
    except ImportError:
        fail("cannot import EDM's `dnnlib`: put a checkout of https://github.com/NVlabs/edm on PYTHONPATH")
    with open(path, "rb") as f:
        data = pickle.load(f)
    if key not in data:
        fail(f"{path}: no entry `{key}` in the pickle (has: {', '.join(sorted(data))})")
    net = data[key]
    name = type(net).__name__
    if name != "EDMPrecond":
        fail(f"{path}: `{key}` is a {name}; dmd-burn reads EDMPrecond networks")
    kwargs = dict(getattr(net, "init_kwargs", {}))
    if not kwargs:
        fail(f"{path}: the network has no init_kwargs (not an EDM persistent class?)")
    return net.state_dict(), kwargs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="EDM .pkl, or a state_dict file with --kwargs")
    ap.add_argument("out", help="output path without extension (writes OUT.safetensors and OUT.json)")
    ap.add_argument("--key", default="ema", help="entry of the pickle to export (default: ema)")
    ap.add_argument("--kwargs", help="JSON of EDMPrecond's kwargs, for a bare state_dict")
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    if args.kwargs:
        state = torch.load(args.src, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        with open(args.kwargs) as f:
            kwargs = json.load(f)
    else:
        if not args.src.endswith(".pkl"):
            fail(f"{args.src}: expected an EDM .pkl (or give --kwargs for a state_dict)")
        state, kwargs = load_pickle(args.src, args.key)

    tensors = {}
    for name, t in state.items():
        if not torch.is_tensor(t):
            continue
        if not t.is_floating_point():
            fail(f"tensor `{name}` has dtype {t.dtype}; expected floating point")
        tensors[name] = t.detach().to(torch.float32).contiguous().cpu()
    if not all(k.startswith("model.") for k in tensors):
        fail("expected an EDMPrecond state_dict (names starting with `model.`)")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(tensors, args.out + ".safetensors", metadata={"format": "pt"})
    with open(args.out + ".json", "w") as f:
        json.dump(jsonable(kwargs), f, indent=2)
    n = sum(t.numel() for t in tensors.values())
    print(f"wrote {args.out}.safetensors ({len(tensors)} tensors, {n / 1e6:.1f}M values) and {args.out}.json")


if __name__ == "__main__":
    main()
