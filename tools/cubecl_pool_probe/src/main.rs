//! How long one reservation takes in CubeCL 0.11.3's memory manager (the default `Adaptive`
//! pools, on the host: the same code CubeCL's device thread runs on CUDA, without a GPU),
//! in a training step's allocation pattern, while a run's long-lived tensors (weights, two
//! Adam moments, an EMA, ...) are held:
//!
//! - `shared pages`: as Burn allocates them by default, in the pages activations are carved
//!   from (each reservation walks and coalesces the slices of every page before one that fits);
//! - `persistent pool`: in CubeCL's persistent pool (exact-size slots found in a hash map),
//!   where dmd-burn now keeps them (`models/src/fused_update.rs`, `persistent`);
//! - `enforced`: every allocation in the persistent pool (`cubecl.toml`:
//!   `[memory] persistent_memory = "enforced"`).
//!
//! Pages are bookkept, not allocated (CubeCL's dry-run mapping), so the host's allocator
//! stays out of the times. Usage, from `tools/cubecl_pool_probe`:
//! `cargo run --release -- adm_imagenet64_param_sizes.txt` (the element counts of the 553
//! parameter tensors of dmd-burn's `EdmPrecond` with
//! `experiments/configs/networks/adm_imagenet64.json`, one per line).

use cubecl_ir::MemoryDeviceProperties;
use cubecl_server::logging::ServerLogger;
use cubecl_server::memory_management::{
    ErrorGraph, ManagedMemoryHandle, MemoryAllocationMode, MemoryConfiguration, MemoryManagement, MemoryManagementOptions, PageUpdate,
};
use cubecl_server::storage::BytesStorage;
use std::sync::Arc;
use std::time::Instant;

/// The memory manager, timing its reservations.
struct Pools {
    memory: MemoryManagement<BytesStorage>,
    failures: ErrorGraph,
    reservations: usize,
    seconds: f64,
}

impl Pools {
    fn new() -> Self {
        // An 80 GB card as CubeCL's CUDA runtime describes one (pages up to a quarter of it,
        // 512-byte alignment).
        let properties = MemoryDeviceProperties::new(20 << 30, 512).with_max_memory(80 << 30);
        let memory = MemoryManagement::from_configuration(
            BytesStorage::default(),
            &properties,
            MemoryConfiguration::Adaptive,
            Arc::new(ServerLogger::default()),
            MemoryManagementOptions::new("probe"),
        );
        Self { memory, failures: ErrorGraph::default(), reservations: 0, seconds: 0.0 }
    }

    fn reserve(&mut self, bytes: u64) -> ManagedMemoryHandle {
        let t = Instant::now();
        let handle = self.memory.reserve(bytes, PageUpdate::Allow, &mut self.failures).expect("reservation");
        self.seconds += t.elapsed().as_secs_f64();
        self.reservations += 1;
        handle
    }

    /// Opens (persistent) or closes (auto) a persistent window.
    fn mode(&mut self, mode: MemoryAllocationMode) {
        self.memory.mode(mode);
    }

    /// Bytes the pools hold (pages and persistent slots).
    fn reserved_gib(&self) -> f64 {
        let report = self.memory.memory_report();
        let dynamic: u64 = report.dynamic.iter().map(|pool| pool.usage.bytes_reserved).sum();
        (dynamic + report.persistent.usage.bytes_reserved) as f64 / (1u64 << 30) as f64
    }
}

/// One training step's allocations: a forward that keeps one activation per layer for the
/// backward and makes two short-lived ones and a small one (kernel metadata, an embedding);
/// a backward that frees the kept ones in reverse while making input gradients and two weight
/// gradients per layer, held until the update (which writes in place: no allocations).
fn step(pools: &mut Pools, params: &[u64], activations: &[u64]) {
    const LAYERS: usize = 300;
    let mut kept = Vec::new();
    for i in 0..LAYERS {
        let a = activations[i % activations.len()];
        let _short = [pools.reserve(a), pools.reserve(a)];
        kept.push(pools.reserve(a));
        let _small = pools.reserve(256);
    }
    let mut weight_grads = Vec::new();
    let mut param = params.iter().cycle();
    for i in (0..LAYERS).rev() {
        let _input_grad = pools.reserve(activations[i % activations.len()]);
        let _small = pools.reserve(256);
        for _ in 0..2 {
            weight_grads.push(pools.reserve(*param.next().expect("cycle")));
        }
        kept.pop();
    }
}

/// Three steps timed: (us per reservation, ms per step).
fn timed_steps(pools: &mut Pools, params: &[u64], activations: &[u64]) -> (f64, f64) {
    (pools.reservations, pools.seconds) = (0, 0.0);
    for _ in 0..3 {
        step(pools, params, activations);
    }
    (pools.seconds * 1e6 / pools.reservations as f64, pools.seconds * 1e3 / 3.0)
}

/// A forward without autodiff: per layer two short-lived activations, one kept until the next
/// layer and a small one.
fn forward(pools: &mut Pools, activations: &[u64]) {
    let mut previous = None;
    for i in 0..300 {
        let a = activations[i % activations.len()];
        let _short = [pools.reserve(a), pools.reserve(a)];
        previous = Some(pools.reserve(a));
        let _small = pools.reserve(256);
    }
    drop(previous);
}

/// `dmd bench`'s order: a network's forward timed, then training steps with a second copy of
/// the network and its Adam moments (dropped after them), then the first network's forward
/// again (on CUDA ~3x slower after than before).
fn forward_before_and_after_training(params: &[u64], activations: &[u64], persistent: bool) {
    let mut pools = Pools::new();
    let window = |pools: &mut Pools, open: bool| {
        if persistent {
            pools.mode(if open { MemoryAllocationMode::Persistent } else { MemoryAllocationMode::Auto });
        }
    };
    let time_forward = |pools: &mut Pools| {
        forward(pools, activations);
        (pools.reservations, pools.seconds) = (0, 0.0);
        for _ in 0..3 {
            forward(pools, activations);
        }
        pools.seconds * 1e6 / pools.reservations as f64
    };
    window(&mut pools, true);
    let net: Vec<_> = params.iter().map(|&b| pools.reserve(b)).collect();
    window(&mut pools, false);
    let before = time_forward(&mut pools);
    {
        window(&mut pools, true);
        let state: Vec<_> = params.iter().cycle().take(3 * params.len()).map(|&b| pools.reserve(b)).collect();
        window(&mut pools, false);
        for _ in 0..5 {
            step(&mut pools, params, activations);
        }
        drop(state);
    }
    let after = time_forward(&mut pools);
    drop(net);
    let placement = if persistent { "persistent pool" } else { "shared pages" };
    println!("{placement:<16} a forward's reservations: {before:.2} us before training steps, {after:.2} us after");
}

fn main() {
    let path = std::env::args().nth(1).expect("usage: cubecl-pool-probe PARAM_SIZES.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let params: Vec<u64> = text.lines().map(|l| l.trim().parse::<u64>().unwrap_or_else(|e| panic!("{path}: {l:?}: {e}")) * 4).collect();
    // Batch-8 float32 activations of a 64x64 ADM at its four resolutions, and an embedding.
    let activations: Vec<u64> = [192 * 64 * 64, 384 * 32 * 32, 576 * 16 * 16, 768 * 8 * 8, 768].map(|n| 8 * n * 4).to_vec();
    let _bookkept = cubecl_runtime::dry_run::DryRun::new();
    println!("{} parameter tensors ({:.2} GiB in float32); a step: 2400 reservations", params.len(), params.iter().sum::<u64>() as f64 / (1u64 << 30) as f64);
    forward_before_and_after_training(&params, &activations, false);
    forward_before_and_after_training(&params, &activations, true);
    for placement in ["shared pages", "persistent pool", "enforced"] {
        let mut pools = Pools::new();
        if placement == "enforced" {
            pools.mode(MemoryAllocationMode::Persistent);
        }
        let mut long_lived = Vec::new();
        // The weights; + Adam's two moments and an EMA; a DMD run: three networks, two sets
        // of moments, an EMA.
        for copies in [1, 4, 8] {
            if placement == "persistent pool" {
                pools.mode(MemoryAllocationMode::Persistent);
            }
            while long_lived.len() < copies * params.len() {
                let bytes = params[long_lived.len() % params.len()];
                long_lived.push(pools.reserve(bytes));
            }
            if placement == "persistent pool" {
                pools.mode(MemoryAllocationMode::Auto);
            }
            step(&mut pools, &params, &activations);
            let (us, ms) = timed_steps(&mut pools, &params, &activations);
            println!(
                "{placement:<16} {:>5} long-lived tensors: {us:>6.2} us per reservation, {ms:>6.1} ms per step; pools hold {:.1} GiB",
                long_lived.len(),
                pools.reserved_gib(),
            );
        }
        // CubeCL's CUDA runtime keeps the device buffers of up to 4096 kernels' metadata (shapes,
        // strides, scalars; up to 2 KiB each) for reuse: live small allocations, in the small
        // pages (or, enforced, the persistent pool).
        let infos: Vec<_> = (0..4096u64).map(|i| pools.reserve(64 + 8 * (i % 249))).collect();
        let (us, ms) = timed_steps(&mut pools, &params, &activations);
        println!("{placement:<16} {:>5} long-lived tensors and {} kernel infos cached: {us:>6.2} us per reservation, {ms:>6.1} ms per step", long_lived.len(), infos.len());
    }
}
