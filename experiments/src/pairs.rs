//! `dmd make-pairs`: the teacher's deterministic ODE outputs for seeded noise, the paired data
//! of DMD's regression loss. Written as shards (`pairs-000000.safetensors`, tensors `latents`
//! [n,C,H,W], `images` [n,C,H,W] and for conditional teachers `labels` [n,L]) beside a
//! `pairs.json` manifest; a rerun skips finished shards, so an interrupted job resumes.
//! `--shard I/N` splits the job over N processes: each writes the shard files k with
//! k % N == I (pair i always uses seed `seed + i`, shard k always holds pairs
//! [k * shard_size, (k + 1) * shard_size), batched from its first pair) and the same manifest,
//! so together they leave the folder byte for byte as one unsharded run does.

use crate::device::Backend;
use crate::sample::{concat_rows, latents_from_seeds, progress, sample_batched, Shard};
use anyhow::{bail, Context, Result};
use dmd_models::weights::sync_parent;
use dmd_models::{config_path_for, EdmPrecond, HostTensor, NamedTensors, SamplerConfig, Solver};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct MakePairsArgs {
    #[arg(long)]
    pub teacher: PathBuf,
    #[arg(long)]
    pub teacher_config: Option<PathBuf>,
    /// Number of pairs.
    #[arg(long)]
    pub num: usize,
    /// Heun steps of the teacher (DMD: 256 for ImageNet, 18 for CIFAR-10).
    #[arg(long, default_value_t = 18)]
    pub steps: usize,
    /// Pair i uses seed `seed + i`.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 1000)]
    pub shard_size: usize,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub device: Backend,
    /// `I/N`: write only the shard files k with k % N == I (0 <= I < N), for N processes or
    /// devices sharing one --out; once all N have run the folder is the unsharded run's.
    #[arg(long, value_name = "I/N", allow_hyphen_values = true)]
    pub shard: Option<String>,
}

/// What a pairs folder holds; a rerun must ask for the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairsManifest {
    pub teacher: PathBuf,
    pub num: usize,
    pub steps: usize,
    pub seed: u64,
    pub shard_size: usize,
    pub image_shape: [usize; 3],
    pub label_dim: usize,
}

fn shard_path(dir: &Path, k: usize) -> PathBuf {
    dir.join(format!("pairs-{k:06}.safetensors"))
}

/// Whether `args.out` holds every shard of pairs made with these settings.
pub fn finished(args: &MakePairsArgs) -> bool {
    let Ok(text) = std::fs::read_to_string(args.out.join("pairs.json")) else { return false };
    let Ok(old) = serde_json::from_str::<PairsManifest>(&text) else { return false };
    let same = old.teacher == args.teacher && old.num == args.num && old.steps == args.steps && old.seed == args.seed && old.shard_size == args.shard_size;
    same && (0..args.num.div_ceil(args.shard_size.max(1))).all(|k| shard_path(&args.out, k).exists())
}

pub fn run(args: &MakePairsArgs) -> Result<()> {
    if args.num == 0 || args.shard_size == 0 || args.batch == 0 {
        bail!("--num, --shard-size and --batch must be positive");
    }
    let part = Shard::from_arg(args.shard.as_deref())?;
    let sampler = SamplerConfig { solver: Solver::Heun, num_steps: args.steps, ..SamplerConfig::default() };
    sampler.validate().map_err(|e| anyhow::anyhow!("--steps: {e}"))?;
    let device = args.device.device()?;
    let cfg_path = args.teacher_config.clone().unwrap_or_else(|| config_path_for(&args.teacher));
    let net = EdmPrecond::load(&args.teacher, &cfg_path, &device, "teacher")?;
    let manifest = PairsManifest {
        teacher: args.teacher.clone(),
        num: args.num,
        steps: args.steps,
        seed: args.seed,
        shard_size: args.shard_size,
        image_shape: net.image_shape(),
        label_dim: net.label_dim(),
    };
    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
    let mpath = args.out.join("pairs.json");
    if mpath.exists() {
        let old: PairsManifest = serde_json::from_str(&std::fs::read_to_string(&mpath)?).with_context(|| mpath.display().to_string())?;
        if old != manifest {
            let diff = crate::checkpoint::config_diff(&old, &manifest);
            bail!("{}: this folder holds pairs made with other settings ({}); choose another --out", mpath.display(), diff.join(", "));
        }
    }
    // Every process of a sharded job writes the same manifest (atomically, each through its own
    // temporary file).
    if !mpath.exists() {
        write_atomic_unique(&mpath, serde_json::to_string_pretty(&manifest)?.as_bytes()).with_context(|| mpath.display().to_string())?;
    }
    let shards = args.num.div_ceil(args.shard_size);
    let range = |k: usize| (k * args.shard_size, ((k + 1) * args.shard_size).min(args.num));
    let mine: Vec<usize> = (0..shards).filter(|&k| part.owns(k)).collect();
    let bar = progress(mine.iter().map(|&k| (range(k).1 - range(k).0) as u64).sum(), "make-pairs");
    for &k in &mine {
        let (start, end) = range(k);
        if shard_path(&args.out, k).exists() {
            bar.inc((end - start) as u64);
            continue;
        }
        let seeds: Vec<u64> = (start..end).map(|i| args.seed + i as u64).collect();
        let (latents, labels) = latents_from_seeds(&seeds, manifest.image_shape, manifest.label_dim, None);
        let images = sample_batched(&net, &device, &latents, labels.as_ref(), &sampler, &seeds, args.batch, false);
        let mut shard = NamedTensors::default();
        shard.insert("latents", latents);
        shard.insert("images", images);
        if let Some(l) = labels {
            shard.insert("labels", l);
        }
        shard.write(&shard_path(&args.out, k))?;
        bar.inc((end - start) as u64);
    }
    bar.finish_and_clear();
    let present = (0..shards).filter(|&k| shard_path(&args.out, k).exists()).count();
    if present == shards {
        eprintln!("{} pairs ({} Heun steps of the teacher) in {}", args.num, args.steps, args.out.display());
    } else {
        eprintln!(
            "shard {}/{}: {} of {} shard files in {} ({} pairs, {} Heun steps); the rest belong to the other --shard runs",
            part.index,
            part.count,
            present,
            shards,
            args.out.display(),
            args.num,
            args.steps
        );
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file of this process's own (so that processes
/// writing the same file at once do not share one), synced, then renamed over `path`.
fn write_atomic_unique(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// All pairs of a folder made by `make-pairs`: (latents, images, labels).
pub struct Pairs {
    pub latents: HostTensor,
    pub images: HostTensor,
    pub labels: Option<HostTensor>,
}

impl Pairs {
    pub fn load(dir: &Path) -> Result<Self> {
        let mpath = dir.join("pairs.json");
        let m: PairsManifest = serde_json::from_str(&std::fs::read_to_string(&mpath).with_context(|| mpath.display().to_string())?)
            .with_context(|| mpath.display().to_string())?;
        if m.num == 0 || m.shard_size == 0 {
            bail!("{}: `num` and `shard_size` must be positive", mpath.display());
        }
        let shards = m.num.div_ceil(m.shard_size);
        let (mut lat, mut img, mut lab) = (Vec::new(), Vec::new(), Vec::new());
        for k in 0..shards {
            let p = shard_path(dir, k);
            if !p.exists() {
                bail!("{}: missing; finish the pairs with `dmd make-pairs` (it resumes)", p.display());
            }
            let t = NamedTensors::read(&p)?;
            // Each shard as pairs.json describes it: its rows, the image shape, the labels.
            let n = (m.num - k * m.shard_size).min(m.shard_size);
            let [c, h, w] = m.image_shape;
            let get = |key: &str, shape: &[usize]| -> Result<HostTensor> {
                let v = t.get(key).cloned().with_context(|| format!("{}: no tensor `{key}`", p.display()))?;
                if v.shape != shape {
                    bail!("{}: tensor `{key}` has shape {:?}, pairs.json says {shape:?}", p.display(), v.shape);
                }
                if v.data.iter().any(|x| !x.is_finite()) {
                    bail!("{}: tensor `{key}` holds a non-finite value", p.display());
                }
                Ok(v)
            };
            lat.push(get("latents", &[n, c, h, w])?);
            img.push(get("images", &[n, c, h, w])?);
            if m.label_dim > 0 {
                lab.push(get("labels", &[n, m.label_dim])?);
            }
        }
        Ok(Self {
            latents: concat_rows(&lat),
            images: concat_rows(&img),
            labels: (m.label_dim > 0).then(|| concat_rows(&lab)),
        })
    }

    pub fn len(&self) -> usize {
        self.latents.shape[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
