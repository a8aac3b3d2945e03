//! `dmd txt2img`: images from prompts with a Stable Diffusion teacher (PNDM or DDIM with
//! classifier-free guidance) or with a one-step generator from `dmd distill`, and the timing
//! of the two (text encoding and VAE decoding included).

use crate::device::Backend;
use crate::output::{write_images, OutKind};
use dmd_models::lpips::upsample_bilinear;
use crate::sample::progress;
use crate::sd_distill::{generate, generator_timestep, seeded_latents};
use anyhow::{bail, Context, Result};
use burn::tensor::Tensor;
use dmd_datasets::prompts::read_prompts;
use dmd_models::sd::pipeline::StableDiffusion;
use dmd_models::sd::scheduler::SchedulerKind;
use dmd_models::sd::unet::UNet2DCondition;
use dmd_models::HostTensor;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Txt2ImgArgs {
    /// Stable Diffusion folder (diffusers layout: tokenizer/, text_encoder/, unet/, vae/, scheduler/).
    #[arg(long)]
    pub teacher: PathBuf,
    /// A one-step generator folder from `dmd distill` (OUT/generator): one UNet call per image
    /// instead of the teacher's sampler.
    #[arg(long)]
    pub generator: Option<PathBuf>,
    /// A prompt (repeat for several); one image per prompt.
    #[arg(long = "prompt")]
    pub prompts: Vec<String>,
    /// A file of prompts, one per line (`#` comments).
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Teacher sampler steps (PNDM: steps + 1 UNet calls, each doubled by guidance).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance of the teacher (1: none).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Teacher sampler: pndm (PLMS, SD v1.5's default) or ddim.
    #[arg(long, default_value = "pndm")]
    pub scheduler: SchedulerKind,
    /// Seed of the first image's noise; image i uses seed + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images per network call.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Backend,
    /// Output: a `.png` grid (one tile per prompt, in order), a folder (one PNG per prompt,
    /// `000000.png`, ...: what `dmd fid calc --images` reads) or a `.safetensors` file.
    #[arg(long)]
    pub out: PathBuf,
    /// Resize every image to this square size (bilinear) before writing: the COCO protocol
    /// compares 256x256 images.
    #[arg(long)]
    pub resize: Option<usize>,
}

/// How images are drawn: the teacher's guided sampler, or a one-step generator.
pub enum Drawer {
    Teacher { kind: SchedulerKind, steps: usize, guidance: f64 },
    Generator { unet: UNet2DCondition, timestep: usize },
}

impl Drawer {
    pub fn unet_calls(&self, sd: &StableDiffusion) -> usize {
        match self {
            Self::Teacher { kind, steps, guidance } => {
                let calls = dmd_models::sd::scheduler::Scheduler::new(&sd.scheduler, *kind, *steps).map(|s| s.timesteps().len()).unwrap_or(0);
                if *guidance == 1.0 { calls } else { 2 * calls }
            }
            Self::Generator { .. } => 1,
        }
    }

    /// Images in [-1, 1] for `prompts` with seeds `seeds` (same length), text encoding and
    /// decoding included.
    pub fn images(&self, sd: &StableDiffusion, prompts: &[String], seeds: &[u64]) -> Result<Tensor<4>> {
        let z = seeded_latents(seeds, sd.latent_shape(), &sd.device);
        let cond = sd.encode_prompts(prompts);
        let latents = match self {
            Self::Teacher { kind, steps, guidance } => {
                let uncond = sd.encode_prompts(&[String::new()]);
                sd.sample_latents(*kind, *steps, *guidance, z, cond, uncond, |_, _| {})?
            }
            Self::Generator { unet, timestep } => generate(unet, z, cond, *timestep, sd.scheduler.alphas_cumprod()[*timestep]),
        };
        Ok(sd.decode(latents))
    }
}

pub fn run(args: &Txt2ImgArgs) -> Result<()> {
    let mut prompts = args.prompts.clone();
    if let Some(f) = &args.prompt_file {
        prompts.extend(read_prompts(f)?);
    }
    if prompts.is_empty() {
        bail!("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE");
    }
    if args.batch == 0 {
        bail!("--batch must be positive");
    }
    if !(args.guidance >= 1.0 && args.guidance.is_finite()) {
        bail!("--guidance must be at least 1, got {}", args.guidance);
    }
    if args.resize == Some(0) {
        bail!("--resize must be positive");
    }
    let device = args.device.device()?;
    let sd = StableDiffusion::load(&args.teacher, &device)?;
    let drawer = match &args.generator {
        Some(dir) => {
            let unet = UNet2DCondition::load(dir, &device).with_context(|| format!("--generator {}", dir.display()))?;
            sd.check_unet(&unet, &dir.join("config.json"))?;
            let timestep = generator_timestep(dir)?;
            if timestep >= sd.scheduler.num_train_timesteps {
                bail!("{}: generator timestep {timestep} is outside the teacher's schedule", dir.display());
            }
            Drawer::Generator { unet, timestep }
        }
        None => {
            dmd_models::sd::scheduler::Scheduler::new(&sd.scheduler, args.scheduler, args.steps).map_err(|e| anyhow::anyhow!("--steps: {e}"))?;
            Drawer::Teacher { kind: args.scheduler, steps: args.steps, guidance: args.guidance }
        }
    };
    // A folder gets each batch as it is done (and a rerun skips the images already there, so
    // a 30k-caption run resumes); a grid or tensor file is written at the end.
    let folder = OutKind::of(&args.out) == OutKind::Folder;
    let bar = progress(prompts.len() as u64, "txt2img");
    let t0 = Instant::now();
    let (mut parts, mut drawn, mut shape) = (Vec::new(), 0usize, [0usize; 2]);
    for (b, chunk) in prompts.chunks(args.batch).enumerate() {
        let first = b * args.batch;
        let names: Vec<String> = (first..first + chunk.len()).map(|i| format!("{i:06}")).collect();
        if folder && names.iter().all(|n| args.out.join(format!("{n}.png")).exists()) {
            bar.inc(chunk.len() as u64);
            continue;
        }
        let seeds: Vec<u64> = (0..chunk.len() as u64).map(|i| args.seed + first as u64 + i).collect();
        let mut images = drawer.images(&sd, chunk, &seeds)?;
        if let Some(size) = args.resize {
            images = upsample_bilinear(images, [size, size]);
        }
        let images = HostTensor::from_tensor(images);
        shape = [images.shape[2], images.shape[3]];
        drawn += chunk.len();
        if folder {
            write_images(&args.out, &images, None, &names)?;
        } else {
            parts.push(images);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    if !folder {
        write_images(&args.out, &crate::sample::concat_rows(&parts), None, &[])?;
    }
    if drawn == 0 {
        eprintln!("all {} images already in {}", prompts.len(), args.out.display());
        return Ok(());
    }
    eprintln!(
        "{drawn} image(s) of {}x{} in {:.2} s ({:.1} ms per image, {} UNet call(s) each) -> {}",
        shape[1],
        shape[0],
        secs,
        1000.0 * secs / drawn as f64,
        drawer.unet_calls(&sd),
        args.out.display()
    );
    Ok(())
}

/// Wall time per image (ms, median of `iters` after one warm-up) of one batch of `batch`
/// images: the one-step generator and the teacher's guided sampler, text encoding and VAE
/// decoding included. Without a generator the teacher's UNet stands in (same network, same
/// cost).
pub struct Txt2ImgTiming {
    pub one_step_ms: f64,
    pub teacher_ms: f64,
    pub teacher_unet_calls: usize,
}

pub fn time_txt2img(sd: &StableDiffusion, generator: Option<&Path>, steps: usize, guidance: f64, batch: usize, iters: usize) -> Result<Txt2ImgTiming> {
    if batch == 0 || iters == 0 {
        bail!("--batch and --iters must be positive");
    }
    let (unet, timestep) = match generator {
        Some(dir) => {
            let unet = UNet2DCondition::load(dir, &sd.device)?;
            sd.check_unet(&unet, &dir.join("config.json"))?;
            let timestep = generator_timestep(dir)?;
            if timestep >= sd.scheduler.num_train_timesteps {
                bail!("{}: generator timestep {timestep} is outside the teacher's schedule", dir.display());
            }
            (unet, timestep)
        }
        None => (sd.unet.clone(), 999.min(sd.scheduler.num_train_timesteps - 1)),
    };
    let one = Drawer::Generator { unet, timestep };
    let teacher = Drawer::Teacher { kind: SchedulerKind::Pndm, steps, guidance };
    let prompts: Vec<String> = dmd_datasets::prompts::builtin_prompts().into_iter().cycle().take(batch).collect();
    let seeds: Vec<u64> = (0..batch as u64).collect();
    let time = |d: &Drawer| -> Result<f64> {
        let mut v = Vec::new();
        for i in 0..=iters {
            let t0 = Instant::now();
            let img = d.images(sd, &prompts, &seeds)?;
            let _ = img.into_data(); // wait for the device
            if i > 0 {
                v.push(t0.elapsed().as_secs_f64() * 1000.0 / batch as f64);
            }
        }
        v.sort_by(f64::total_cmp);
        Ok(v[v.len() / 2])
    };
    Ok(Txt2ImgTiming { one_step_ms: time(&one)?, teacher_ms: time(&teacher)?, teacher_unet_calls: teacher.unet_calls(sd) })
}
