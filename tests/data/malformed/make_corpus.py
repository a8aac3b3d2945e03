#!/usr/bin/env python3
"""Writes the malformed-input corpus of tests/malformed_inputs.rs (run from this folder).

Every file is derived deterministically from the two valid tiny teachers in nets/ (ToyMLP,
hidden_dim 4, one layer, on the eight Gaussians; made by `dmd train-teacher` for one step) and
from literals below. nets/ and resume/ are not written here: resume/ holds run folders made by
`dmd train-teacher` / `dmd distill` on resume/*.toml, then damaged by hand (see cases.toml).
Needs numpy (for the .npz files) and Pillow (for the PNGs).
"""

import io
import json
import os
import struct

import numpy as np
from PIL import Image


def read_st(path):
    """A safetensors file as ({name: (dtype, shape, bytes)}, metadata)."""
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    data = b[8 + n :]
    out = {k: (v["dtype"], v["shape"], data[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items()}
    return out, meta


def st_bytes(tensors, meta=None):
    header, blobs, off = {}, [], 0
    if meta is not None:
        header["__metadata__"] = meta
    for k in sorted(tensors):
        dtype, shape, raw = tensors[k]
        header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def f32(values):
    return struct.pack(f"<{len(values)}f", *values)


def write(path, data):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


toy, toy_meta = read_st("nets/toy.safetensors")
toy_json = json.load(open("nets/toy.json"))

# --- weights/: `dmd sample --teacher` --------------------------------------------------------
valid = open("nets/toy.safetensors", "rb").read()
write("weights/truncated.safetensors", valid[:-40])  # the last tensor's data cut short
write("weights/bad_header.safetensors", b"\x89PNG\r\n\x1a\n" + valid[8:])  # a PNG signature where the header length goes
t = dict(toy)
del t["model.output.bias"]
write("weights/missing_tensor.safetensors", st_bytes(t, toy_meta))
t = dict(toy)
t["model.layers.0.weight"] = ("F32", [4, 4], f32([0.1] * 16))  # as if num_layers = 2
write("weights/extra_tensor.safetensors", st_bytes(t, toy_meta))
t = dict(toy)
t["model.input.weight"] = ("F32", [2, 4], toy["model.input.weight"][2])  # transposed
write("weights/wrong_shape.safetensors", st_bytes(t, toy_meta))
t = dict(toy)
t["model.output.bias"] = ("I8", [2], b"\x01\x02")
write("weights/wrong_dtype.safetensors", st_bytes(t, toy_meta))
t = dict(toy)
w = list(struct.unpack("<16f", toy["model.map_layer0.weight"][2]))
w[5] = float("nan")
t["model.map_layer0.weight"] = ("F32", [4, 4], f32(w))
write("weights/nonfinite.safetensors", st_bytes(t, toy_meta))
# A generator whose noise levels (safetensors metadata) are not positive.
write("weights/generator_sigmas.safetensors", st_bytes(toy, {"format": "pt", "dmd_generator_sigmas": "[80.0, -1.0]"}))
write("weights/generator_sigmas.json", json.dumps(toy_json, indent=2))

# --- latents/: `dmd sample --latents` --------------------------------------------------------
z = f32([0.5, -0.25, 1.0, 0.0, -1.5, 0.75])
write("latents/wrong_shape.safetensors", st_bytes({"latents": ("F32", [3, 1, 2, 1], z)}))
write("latents/missing.safetensors", st_bytes({"noise": ("F32", [3, 2, 1, 1], z)}))
write("latents/nonfinite.safetensors", st_bytes({"latents": ("F32", [3, 2, 1, 1], f32([0.5, -0.25, float("inf"), 0.0, -1.5, 0.75]))}))
one_hot = lambda n, k, dim: f32([1.0 if j == k else 0.0 for _ in range(n) for j in range(dim)])
write("latents/label_width.safetensors", st_bytes({"latents": ("F32", [3, 2, 1, 1], z), "labels": ("F32", [3, 10], one_hot(3, 1, 10))}))
write("latents/labels_unconditional.safetensors", st_bytes({"latents": ("F32", [3, 2, 1, 1], z), "labels": ("F32", [3, 8], one_hot(3, 1, 8))}))

# --- netcfg/: EDM network configs (JSON), `dmd sample --teacher-config` --------------------------
def cfg(**kw):
    c = dict(toy_json)
    c.update(kw)
    return json.dumps(c, indent=2)


unet = {"img_resolution": 8, "img_channels": 3, "model_type": "SongUNet", "model_channels": 8, "num_blocks": 1, "attn_resolutions": []}
write("netcfg/unknown_key.json", cfg(num_heads=4))
write("netcfg/wrong_type.json", cfg(hidden_dim="four"))
write("netcfg/bad_model_type.json", cfg(model_type="Transformer"))
write("netcfg/sigma_range.json", cfg(sigma_min=80.0, sigma_max=0.002))
write("netcfg/negative_mult.json", json.dumps(dict(unet, channel_mult=[1, -2]), indent=2))
write("netcfg/zero_channels.json", json.dumps(dict(unet, model_type="DhariwalUNet", channel_mult=[1, 0]), indent=2))

# --- stats/: FID statistics, `dmd fid calc --ref` ------------------------------------------------
def npz(path, **arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write(path, buf.getvalue())


write("stats/not_zip.npz", "mu and sigma were here\n")
mu = np.array([0.1, 0.2, 0.3, 0.4])
npz("stats/wrong_shape.npz", mu=mu, sigma=np.eye(4)[:, :3].copy())
s = np.eye(4)
s[2, 1] = np.nan
npz("stats/nonfinite.npz", mu=mu, sigma=s)
npz("stats/missing_sigma.npz", mu=mu)
npz("stats/int_dtype.npz", mu=np.arange(4), sigma=np.eye(4))

# --- data/: training data, `dmd train-teacher` ---------------------------------------------------
def png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


rgb = lambda size, seed: Image.frombytes("RGB", (size, size), bytes((i * 37 + seed * 11) % 256 for i in range(size * size * 3)))
gray = lambda size, seed: Image.frombytes("L", (size, size), bytes((i * 37 + seed * 11) % 256 for i in range(size * size)))
write("data/png_corrupt/img0.png", png(rgb(4, 0)))
write("data/png_corrupt/img1.png", b"this is not a PNG file\n")
write("data/png_truncated/img0.png", png(rgb(4, 0))[:-30])  # cut inside the image data
write("data/png_truncated/img1.png", png(rgb(4, 1)))
write("data/png_size/img0.png", png(rgb(4, 0)))
write("data/png_size/img1.png", png(rgb(8, 1)))
write("data/png_channels/img0.png", png(rgb(4, 0)))
write("data/png_channels/img1.png", png(gray(4, 1)))
for name, labels in [("labels_missing", [["img0.png", 0]]), ("labels_bad", [["img0.png", 0], ["img1.png", "cat"]])]:
    write(f"data/{name}/img0.png", png(rgb(4, 0)))
    write(f"data/{name}/img1.png", png(rgb(4, 1)))
    write(f"data/{name}/dataset.json", json.dumps({"labels": labels}))
write("data/broken.zip", b"PK\x03\x04 a zip that stops here")


def idx(dims, payload, kind=0x08):
    return bytes([0, 0, kind, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + bytes(payload)


pixels = [(i * 13) % 256 for i in range(3 * 4 * 4)]
write("data/idx/images-idx3-ubyte", idx([3, 4, 4], pixels))
write("data/idx/short-images-idx3-ubyte", idx([3, 4, 4], pixels[:20]))  # the header promises 48 bytes
write("data/idx/float-images-idx3-ubyte", idx([3, 4, 4], [0] * (4 * 48), kind=0x0D))
write("data/idx/count-labels-idx1-ubyte", idx([4], [0, 1, 2, 3]))
write("data/idx/range-labels-idx1-ubyte", idx([3], [0, 12, 1]))

# --- pairs/: teacher pairs, `dmd distill` with regression --------------------------------------
def pairs_dir(name, num, shards):
    manifest = {"teacher": "nets/toy.safetensors", "num": num, "steps": 2, "seed": 0, "shard_size": 4, "image_shape": [2, 1, 1], "label_dim": 0}
    write(f"pairs/{name}/pairs.json", json.dumps(manifest, indent=2))
    for k, tensors in enumerate(shards):
        write(f"pairs/{name}/pairs-{k:06d}.safetensors", st_bytes(tensors))


four = f32([0.1 * i for i in range(8)])
three = f32([0.1 * i for i in range(6)])
pairs_dir("missing_shard", 8, [{"latents": ("F32", [4, 2, 1, 1], four), "images": ("F32", [4, 2, 1, 1], four)}])
pairs_dir("missing_images", 4, [{"latents": ("F32", [4, 2, 1, 1], four)}])
pairs_dir("short_images", 4, [{"latents": ("F32", [4, 2, 1, 1], four), "images": ("F32", [3, 2, 1, 1], three)}])

# --- prompts/: prompt files, `dmd txt2img --prompt-file` -------------------------------------
write("prompts/latin1.txt", "a red fox in the snow\n# Latin-1, not UTF-8:\nna\u00efve caf\u00e9 au lait\n".encode("latin-1"))
