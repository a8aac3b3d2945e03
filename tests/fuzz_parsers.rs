//! Fuzzing the parsers of untrusted files: a seeded, structure-aware mutation fuzzer (no
//! `cargo fuzz`: that needs nightly and the network). For each parser it builds valid seeds
//! here (safetensors with metadata; `.npz` statistics as numpy's `savez` writes them, float64
//! and float32; IDX raw and gzipped; EDM dataset zips of PNGs with `dataset.json`; the
//! repository's own train-teacher / distill / experiment TOML and network JSON configs; for
//! Stable Diffusion: CLIP tokenizer folders (`vocab.json` + `merges.txt`, a small synthetic one
//! and the first 1500 merges of the real one), prompts, the UNet / VAE / CLIP text / scheduler
//! JSON configs, the text-to-image distill TOML and prompt files), mutates them (bit flips,
//! interesting bytes and integers, truncation, chunk insertion, duplication and deletion,
//! splicing; rewritten length fields, safetensors header offsets/shapes/dtypes, npy header
//! shape/descr/fortran_order/length/nesting, IDX dims, zip sizes/counts/offsets, PNG IHDR; for
//! text: lines deleted/duplicated/spliced, values replaced by huge, negative, NaN, infinite or
//! wrongly typed ones, keys added; vocabulary entries removed, renumbered or given ids that are
//! no u32, merges malformed, repeated, reordered or naming unknown tokens; prompts with
//! combining marks, length-changing case maps, special tokens, invalid UTF-8 and long words)
//! and calls the real entry points. Every call must
//! return Ok or Err: never panic, never take longer than `DMD_FUZZ_CALL_MS` (2000 ms), never
//! allocate more than `DMD_FUZZ_ALLOC_MIB` (64 MiB; measured by a counting allocator) for
//! inputs of at most ~1 MiB. A call that hangs past 60 s aborts the test with the input's path.
//!
//! `DMD_FUZZ_SECONDS` (default 2) is the time per parser, `DMD_FUZZ_SEED` the seed (printed with
//! the iteration counts; run with `--nocapture` to see them). A failing input is saved under
//! `target/tmp/fuzz_parsers/<parser>/finding-*` and named in the failure.
//!
//! `DMD_FUZZ_REPLAY=<saved folder>` runs one saved input (e.g. `.../npz/finding-0`) once.
//!
//! Record (2-core x86-64, dev profile with overflow checks on; counts are inputs per parser):
//! - Runs: 60 s per parser and seed. Before and between fixes: seeds 1, 2, 3, then 3, 4, 5;
//!   after the fixes: seeds 1-5 clean (and seed 6 for the two zip parsers after the last
//!   change to the zip checks). Per 60 s: safetensors
//!   0.38-0.45M, latents 0.5M, npz 0.27-0.31M, idx 0.2-0.29M, dataset zip 0.11-0.29M, network
//!   JSON 0.25-0.45M, pairs 0.19-0.28M, teacher TOML 0.15-0.22M, distill TOML 0.06-0.19M,
//!   experiment TOML 30-45k. The default (2 s per parser) takes about 11 s (20 s with the 8
//!   Stable Diffusion targets below).
//! - Findings, all fixed:
//!   1. safetensors header length just under the 100 MB cap: `NamedTensors::read_metadata`
//!      allocated it before reading (100 MB for a 1 KB file). Now read through `take`.
//!   2. IDX dims whose product overflows: panic in `read_idx`. Now `checked_mul`.
//!   3. gzipped IDX with more data than its dims (gzip bomb): inflated whole (128 MiB for a
//!      100 KB file). Now the header, then at most the declared size + 1 and 1100x the file.
//!   4. IDX images of 0 rows or columns: division by zero in `ImageDataset::len`. Rejected.
//!   5. npz member with a v2 header length of ~4 GB: npyz allocated it. npz shapes whose size
//!      overflows: panic in npyz. `read_npz` now checks each `.npy` header first (length
//!      inside the member, at most numpy's 10000 bytes, nesting <= 4, which also keeps npyz's
//!      recursive parser off a stack overflow; shape of plain integers fitting the data).
//!   6. zip with many false end-of-central-directory records: the zip crate rescans for each
//!      (0.7 s for 55 KB, 11 s for 1 MiB); an end record declaring 65532 entries made it
//!      reserve 13.6 MB for a 40-byte file. `open_zip` (datasets) bounds the reads while
//!      opening (4x the file) and checks the declared entries against the central directory.
//!   7. PNG whose IHDR declares a large image: decoded buffer allocated up to the image
//!      crate's 512 MiB default (396 MiB for a 434-byte zip). `decode_image` allows 4096x the
//!      file size (at least 16 MiB).
//!   8. `dataset.json` label 18446744073709551615: overflow computing label_dim. Labels are
//!      limited to 2^24 classes.
//!   9. network JSON `channel_mult` entry near 2^64: overflow in `model_channels * mult`
//!      (`EdmConfig::validate`); also `1 << (levels - 1)` for 65+ levels. Both checked.
//!   10. `--set` key with thousands of dotted parts: 543 MiB and 1.4 s for a 24 KB spec, a
//!      stack overflow (abort) at 10000 parts. `set_override` takes at most 16 levels.
//! - Stable Diffusion targets (sd_tokenizer, sd_tokenizer_encode, sd_unet_config,
//!   sd_vae_config, sd_clip_config, sd_scheduler_config, sd_distill_config, prompt_file). Beyond
//!   Ok/Err they check what callers rely on: `encode` gives 77 ids, start first, end last, each
//!   below the vocabulary's size; file errors name the file; a valid UNet / VAE / CLIP config
//!   builds its network (small ones) and an empty weights file is an error, not a panic; UNet,
//!   VAE and distill configs survive the save -> load round trip (the run folder's
//!   config.toml); scheduler configs give timesteps inside the schedule and run short samplers.
//!   Runs: 30 s per target with seeds 20240601 and 2, then 60 s with seeds 1 and 3, clean
//!   after the fixes. Per 60 s: tokenizer folder 29-30k, encode 25-26k, UNet 0.15-0.18M, VAE
//!   0.19-0.22M, CLIP text 0.21-0.23M, scheduler 0.2-0.22M, distill TOML 0.09-0.1M, prompt file
//!   0.26-0.28M.
//! - Findings of the Stable Diffusion targets, both fixed:
//!   - 11: a long word (one BPE piece) took quadratic time: 10 s for 100 KB of random
//!     letters (a prompt file line; slow at 2 s for ~30 KB). `ClipTokenizer::bpe` now merges
//!     from a heap by (rank, position), rank by rank as the reference loop does: 40 ms.
//!   - 12: a `vocab.json` id at or beyond the number of tokens loaded, and the text encoder,
//!     whose table the pipeline sizes by that number, panicked on it (an assertion in
//!     `ClipTextModel::forward`). `ClipTokenizer::load` refuses such ids, naming the token.

use burn::tensor::Tensor;
use dmd_datasets::image::read_idx;
use dmd_datasets::prompts::{read_prompts, PromptSet};
use dmd_datasets::ImageDataset;
use dmd_experiments::data::{DataConfig, DataSource};
use dmd_experiments::distill::DistillConfig;
use dmd_experiments::experiment::ExperimentConfig;
use dmd_experiments::fid::FidStats;
use dmd_experiments::pairs::Pairs;
use dmd_experiments::sample::read_latents;
use dmd_experiments::sd_distill::{is_text_config, TextDistillConfig};
use dmd_experiments::teacher::TeacherConfig;
use dmd_models::sd::tokenizer::{ClipTokenizer, MAX_LENGTH};
use dmd_models::{EdmConfig, ModelType, NamedTensors};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Allocation accounting: live bytes, their peak and the largest single request, per thread
// (each parser is fuzzed on its own thread, so parallel tests do not mix).

struct CountingAlloc;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
    static BIGGEST: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(n: usize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get() + n as i64;
        l.set(v);
        let _ = PEAK.try_with(|p| {
            if v > p.get() {
                p.set(v)
            }
        });
    });
    let _ = BIGGEST.try_with(|b| {
        if n > b.get() {
            b.set(n)
        }
    });
}

fn note_free(n: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get() - n as i64));
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Starts measuring this thread's allocations; returns the baseline.
fn alloc_probe_start() -> i64 {
    BIGGEST.with(|b| b.set(0));
    let live = LIVE.with(|l| l.get());
    PEAK.with(|p| p.set(live));
    live
}

/// (peak growth over the baseline, largest single request) since `alloc_probe_start`.
fn alloc_probe_end(base: i64) -> (u64, u64) {
    let peak = PEAK.with(|p| p.get());
    ((peak - base).max(0) as u64, BIGGEST.with(|b| b.get()) as u64)
}

// ---------------------------------------------------------------------------------------------
// Panics inside a fuzzed call are recorded silently (message and location); others go to the
// default hook as usual.

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(|q| q.get()) {
                // Where it happened: the first frame outside the standard library (a panic
                // in `Iterator::product` is then told apart by its caller).
                let bt = std::backtrace::Backtrace::force_capture().to_string();
                let frame = first_own_frame(&bt);
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{} [in {frame}]", info.to_string().replace('\n', " "))));
            } else {
                default(info)
            }
        }));
    });
}

/// The first frame of a backtrace that is not the standard library, the panic machinery or
/// this test: "function (file:line)".
fn first_own_frame(bt: &str) -> String {
    let lines: Vec<&str> = bt.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let Some((num, func)) = t.split_once(": ") else { continue };
        if num.parse::<usize>().is_err() {
            continue;
        }
        let at = lines.get(i + 1).map(|n| n.trim_start()).filter(|n| n.starts_with("at ")).map(|n| &n[3..]).unwrap_or("");
        let std_fn = ["core::", "std::", "alloc::", "<core::", "<alloc::", "<std::", "__rustc", "rust_begin_unwind", "backtrace", "fuzz_parsers::"].iter().any(|p| func.starts_with(p));
        if std_fn || at.starts_with("/rustc/") || at.contains("fuzz_parsers.rs") {
            continue;
        }
        return format!("{func} ({at})");
    }
    "?".into()
}

// ---------------------------------------------------------------------------------------------
// Settings

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn fuzz_seconds() -> f64 {
    env_f64("DMD_FUZZ_SECONDS", 2.0)
}

fn fuzz_seed() -> u64 {
    std::env::var("DMD_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(20_240_601)
}

fn call_limit() -> Duration {
    Duration::from_millis(env_f64("DMD_FUZZ_CALL_MS", 2000.0) as u64)
}

fn alloc_limit() -> u64 {
    (env_f64("DMD_FUZZ_ALLOC_MIB", 64.0) * 1024.0 * 1024.0) as u64
}

/// No mutated file grows beyond this (bombs are built as seeds, not grown).
const MAX_INPUT: usize = 1 << 20;
/// Text configs are cut to this.
const MAX_TEXT: usize = 256 << 10;
/// A call running this long is a hang: the process is aborted, naming the input.
const HANG: Duration = Duration::from_secs(60);

fn fnv(text: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

// ---------------------------------------------------------------------------------------------
// The driver

/// One input: files (relative path, bytes) written into the parser's work folder.
type Case = Vec<(String, Vec<u8>)>;

struct Target {
    name: &'static str,
    /// Files every input starts from (restored after each call when a case overwrote them).
    fixed: Case,
    seeds: Vec<Case>,
    mutate: Box<dyn Fn(&mut StdRng, &[Case]) -> Case + Send>,
    /// Calls the parser(s) on the work folder.
    exec: Box<dyn Fn(&Path) -> Result<(), String> + Send>,
}

struct Finding {
    kind: &'static str,
    detail: String,
    saved: PathBuf,
    count: usize,
}

fn write_case(dir: &Path, case: &Case) {
    for (rel, bytes) in case {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, bytes).unwrap();
    }
}

fn undo_case(dir: &Path, case: &Case, fixed: &HashMap<String, Vec<u8>>) {
    for (rel, _) in case {
        match fixed.get(rel) {
            Some(orig) => std::fs::write(dir.join(rel), orig).unwrap(),
            None => {
                let _ = std::fs::remove_file(dir.join(rel));
            }
        }
    }
}

/// Saves an input into `dir`, replacing what was there.
fn save_case(dir: &Path, case: &Case) {
    let _ = std::fs::remove_dir_all(dir);
    write_case(dir, case);
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz_parsers").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fuzz(target: Target) {
    install_panic_hook();
    // A thread of its own: the main thread's 8 MiB stack (as `dmd` has), separate allocation
    // accounting.
    let name = target.name;
    let handle = std::thread::Builder::new()
        .name(format!("fuzz-{name}"))
        .stack_size(8 << 20)
        .spawn(move || run_target(target))
        .unwrap();
    let findings = handle.join().unwrap_or_else(|_| panic!("fuzz driver of {name} panicked"));
    if !findings.is_empty() {
        let list: Vec<String> = findings
            .iter()
            .map(|f| format!("- {} (x{}): {}\n  input: {}", f.kind, f.count, f.detail, f.saved.display()))
            .collect();
        panic!("fuzzing {name} found {} problem(s):\n{}", findings.len(), list.join("\n"));
    }
}

fn run_target(t: Target) -> Vec<Finding> {
    // DMD_FUZZ_REPLAY=<folder of a saved input> runs that input once, panics included (read
    // before the scratch folder is emptied).
    let replay = std::env::var_os("DMD_FUZZ_REPLAY").map(PathBuf::from);
    let replay_case = replay.as_ref().filter(|r| r.parent().and_then(|p| p.file_name()).is_some_and(|n| n == t.name)).map(|r| {
        let mut case = Case::new();
        let mut stack = vec![r.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap().path();
                if e.is_dir() {
                    stack.push(e);
                } else {
                    case.push((e.strip_prefix(r).unwrap().to_string_lossy().to_string(), std::fs::read(&e).unwrap()));
                }
            }
        }
        case
    });
    let dir = scratch(t.name);
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    write_case(&work, &t.fixed);
    let fixed: HashMap<String, Vec<u8>> = t.fixed.iter().cloned().collect();
    if replay.is_some() {
        if let Some(case) = replay_case {
            write_case(&work, &case);
            let base = alloc_probe_start();
            let c0 = Instant::now();
            let r = (t.exec)(&work);
            let (grew, biggest) = alloc_probe_end(base);
            println!("replay {}: {:?} in {:?}, allocated {grew} bytes at peak, {biggest} in one request", replay.unwrap().display(), r, c0.elapsed());
        }
        return Vec::new();
    }
    let seed = fuzz_seed();
    let mut rng = StdRng::seed_from_u64(seed ^ fnv(t.name));

    // The seeds must parse, or the fuzzer would start from garbage.
    for (i, case) in t.seeds.iter().enumerate() {
        write_case(&work, case);
        if let Err(e) = (t.exec)(&work) {
            panic!("{}: seed {i} does not parse: {e}", t.name);
        }
        undo_case(&work, case, &fixed);
    }

    // Not captured, so that it is seen when a crash (stack overflow, failed allocation) ends
    // the process: the input that caused it is still in the work folder.
    let _ = writeln!(std::io::stderr(), "fuzz {}: each input is written to {} before the call", t.name, work.display());

    // Watchdog: a call that never returns aborts the process, naming the input folder.
    let busy_since = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    {
        let (busy, done, work) = (busy_since.clone(), done.clone(), work.clone());
        let name = t.name;
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let b = busy.load(Ordering::Relaxed);
                if b > 0 && t0.elapsed().as_millis() as u64 > b + HANG.as_millis() as u64 {
                    eprintln!("fuzz {name}: a call ran over {HANG:?}; its input is in {}", work.display());
                    std::process::abort();
                }
            }
        });
    }

    let budget = Duration::from_secs_f64(fuzz_seconds());
    let (limit_t, limit_a) = (call_limit(), alloc_limit());
    let mut findings: Vec<Finding> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let (mut iters, mut oks, mut slowest, mut most_alloc) = (0u64, 0u64, Duration::ZERO, 0u64);
    let start = Instant::now();
    while start.elapsed() < budget {
        let case = (t.mutate)(&mut rng, &t.seeds);
        write_case(&work, &case);
        busy_since.store(t0.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
        QUIET.with(|q| q.set(true));
        LAST_PANIC.with(|p| *p.borrow_mut() = None);
        let base = alloc_probe_start();
        let c0 = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (t.exec)(&work)));
        let took = c0.elapsed();
        let (grew, biggest) = alloc_probe_end(base);
        QUIET.with(|q| q.set(false));
        busy_since.store(0, Ordering::Relaxed);
        iters += 1;
        // The slowest and the most allocating inputs are kept for a look.
        if took > slowest {
            slowest = took;
            save_case(&dir.join("slowest"), &case);
        }
        if grew.max(biggest) > most_alloc {
            most_alloc = grew.max(biggest);
            save_case(&dir.join("largest-allocation"), &case);
        }
        let mut found: Vec<(&'static str, String, String)> = Vec::new();
        match result {
            Ok(Ok(())) => oks += 1,
            Ok(Err(_)) => {}
            Err(payload) => {
                let msg = LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| {
                    payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
                });
                // Same place, same finding.
                let key = format!("{}{}", msg.split(": ").next().unwrap_or(""), msg.rsplit_once(" [in ").map_or("", |x| x.1));
                found.push(("panic", key, msg));
            }
        }
        if took > limit_t {
            found.push(("slow", "slow".into(), format!("one call took {took:?} (limit {limit_t:?})")));
        }
        if grew > limit_a || biggest > limit_a {
            found.push(("allocation", "alloc".into(), format!("allocated {grew} bytes at peak, {biggest} in one request (limit {limit_a})")));
        }
        for (kind, key, detail) in found {
            if let Some(&i) = by_key.get(&key) {
                findings[i].count += 1;
                continue;
            }
            let saved = dir.join(format!("finding-{}", findings.len()));
            save_case(&saved, &case);
            eprintln!("fuzz {}: {kind} on input {}: {detail}", t.name, saved.display());
            by_key.insert(key, findings.len());
            findings.push(Finding { kind, detail, saved, count: 1 });
        }
        undo_case(&work, &case, &fixed);
    }
    done.store(true, Ordering::Relaxed);
    println!(
        "fuzz {}: seed {seed}, {iters} inputs in {:.1} s ({oks} parsed Ok), slowest call {:.1} ms, largest allocation {:.1} MiB, {} finding(s)",
        t.name,
        start.elapsed().as_secs_f64(),
        slowest.as_secs_f64() * 1e3,
        most_alloc as f64 / (1 << 20) as f64,
        findings.len()
    );
    findings
}

// ---------------------------------------------------------------------------------------------
// Generic mutations

const INTERESTING_U64: [u64; 20] = [
    0,
    1,
    2,
    3,
    7,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    1 << 40,
];

fn interesting(rng: &mut StdRng) -> u64 {
    if rng.random_bool(0.8) {
        INTERESTING_U64[rng.random_range(0..INTERESTING_U64.len())]
    } else {
        rng.random()
    }
}

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

/// A few mutations, more rarely many.
fn mutation_count(rng: &mut StdRng) -> usize {
    let mut n = 1;
    while n < 16 && rng.random_bool(0.45) {
        n += 1;
    }
    n
}

/// One byte-level mutation; `others` are splice sources.
fn mutate_bytes(rng: &mut StdRng, data: &mut Vec<u8>, others: &[&[u8]]) {
    let len = data.len();
    match rng.random_range(0..12) {
        0 if len > 0 => {
            let i = rng.random_range(0..len);
            data[i] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let i = rng.random_range(0..len);
            data[i] = *pick(rng, &[0u8, 0xff, 0x7f, 0x80, b'0', b'9', b'-', b'"', b',', b'[', b'{']);
        }
        2 if len > 0 => {
            let i = rng.random_range(0..len);
            data[i] = rng.random();
        }
        3 => data.truncate(rng.random_range(0..=len)),
        4 => {
            let at = rng.random_range(0..=len);
            let n = rng.random_range(1..=16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            data.splice(at..at, bytes);
        }
        5 if len > 0 => {
            // Duplicate a chunk somewhere else.
            let a = rng.random_range(0..len);
            let b = (a + rng.random_range(1..=256)).min(len);
            let chunk = data[a..b].to_vec();
            let at = rng.random_range(0..=len);
            data.splice(at..at, chunk);
        }
        6 if len > 0 => {
            let a = rng.random_range(0..len);
            let b = (a + rng.random_range(1..=256)).min(len);
            data.drain(a..b);
        }
        7 if len >= 8 => {
            // An integer field at a random place, little or big endian.
            let width = *pick(rng, &[2usize, 4, 8]);
            let i = rng.random_range(0..=len - width);
            let v = interesting(rng);
            let bytes = if rng.random_bool(0.5) { v.to_le_bytes() } else { v.to_be_bytes() };
            let src = if rng.random_bool(0.5) { &bytes[..width] } else { &bytes[8 - width..] };
            data[i..i + width].copy_from_slice(src);
        }
        8 if !others.is_empty() => {
            // Splice: our prefix, another input's suffix.
            let other = pick(rng, others);
            let a = rng.random_range(0..=len);
            let b = rng.random_range(0..=other.len());
            data.truncate(a);
            data.extend_from_slice(&other[b..]);
        }
        9 if len > 0 => {
            let i = rng.random_range(0..len);
            data[i] = data[i].wrapping_add(*pick(rng, &[1u8, 255, 2, 254, 16, 240]));
        }
        10 if len > 0 => {
            // Repeat a chunk many times.
            let a = rng.random_range(0..len);
            let b = (a + rng.random_range(1..=32)).min(len);
            let chunk = data[a..b].to_vec();
            let times = rng.random_range(2..=2000);
            let at = rng.random_range(0..=len);
            let rep: Vec<u8> = chunk.iter().copied().cycle().take(chunk.len() * times).collect();
            data.splice(at..at, rep);
        }
        _ => {
            let i = rng.random_range(0..=len);
            data.insert(i, rng.random());
        }
    }
    data.truncate(MAX_INPUT);
}

// ---------------------------------------------------------------------------------------------
// Text and structured-value mutations (TOML, JSON)

const NUMBERS: [&str; 28] = [
    "0",
    "-1",
    "1",
    "2",
    "-0",
    "0.0",
    "-0.0",
    "0.5",
    "1e-320",
    "3.5",
    "255",
    "65536",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "1e308",
    "-1e308",
    "1e999",
    "nan",
    "inf",
    "-inf",
    "NaN",
    "Infinity",
    "1_000",
];

const VALUES: [&str; 16] = [
    "true",
    "false",
    "null",
    "\"\"",
    "\"x\"",
    "\"cpu\"",
    "\"toy\"",
    "[]",
    "[1, 2]",
    "[[1]]",
    "{}",
    "{ a = 1 }",
    "{\"a\": 1}",
    "\"../x\"",
    "'''\n'''",
    "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67]",
];

/// Spans of number-like tokens in `text`.
fn number_spans(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() || (b[i] == b'-' && i + 1 < b.len() && b[i + 1].is_ascii_digit()) {
            let s = i;
            i += 1;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'.' | b'_' | b'+' | b'-')) {
                i += 1;
            }
            out.push((s, i));
        } else {
            i += 1;
        }
    }
    out
}

/// Spans of values after `=` or `:` up to the end of the line (or `,`).
fn value_spans(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    for (i, &c) in b.iter().enumerate() {
        if c == b'=' || c == b':' {
            let s = i + 1;
            let mut e = s;
            while e < b.len() && b[e] != b'\n' && b[e] != b',' {
                e += 1;
            }
            out.push((s, e));
        }
    }
    out
}

fn string_spans(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut open = None;
    for (i, &c) in b.iter().enumerate() {
        if c == b'"' {
            match open {
                None => open = Some(i),
                Some(s) => {
                    out.push((s, i + 1));
                    open = None;
                }
            }
        } else if c == b'\n' {
            open = None;
        }
    }
    out
}

fn replace_span(text: &str, (a, b): (usize, usize), with: &str) -> String {
    if !text.is_char_boundary(a) || !text.is_char_boundary(b) {
        return text.to_string();
    }
    format!("{}{}{}", &text[..a], with, &text[b..])
}

/// One text mutation; `others` are lines and snippets from every seed (a dictionary).
fn mutate_text(rng: &mut StdRng, text: &str, dict: &[String]) -> String {
    let lines: Vec<&str> = text.split('\n').collect();
    let n = lines.len();
    match rng.random_range(0..11) {
        0 => {
            let mut l = lines.clone();
            l.remove(rng.random_range(0..n));
            l.join("\n")
        }
        10 => {
            // Deep nesting: a dotted key, a table header, nested arrays or inline tables, or a
            // `--set` path.
            let depth = *pick(rng, &[10usize, 100, 1000, 10_000]);
            let line = match rng.random_range(0..5) {
                0 => format!("{} = 1", vec!["train"; depth].join(".")),
                1 => format!("[{}]", vec!["eval"; depth].join(".")),
                2 => format!("x = {}1{}", "[".repeat(depth), "]".repeat(depth)),
                3 => format!("x = {}{}", "{ a = ".repeat(depth), "}".repeat(depth)),
                _ => format!("{}=1", vec!["distill"; depth].join(".")),
            };
            let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
            l.insert(rng.random_range(0..=n), line);
            l.join("\n")
        }
        1 => {
            let mut l = lines.clone();
            let i = rng.random_range(0..n);
            let at = rng.random_range(0..=n);
            l.insert(at, lines[i]);
            l.join("\n")
        }
        2 if n > 1 => {
            let mut l = lines.clone();
            let (i, j) = (rng.random_range(0..n), rng.random_range(0..n));
            l.swap(i, j);
            l.join("\n")
        }
        3 if !dict.is_empty() => {
            let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
            l.insert(rng.random_range(0..=n), pick(rng, dict).clone());
            l.join("\n")
        }
        4 | 5 => {
            let spans = number_spans(text);
            if spans.is_empty() {
                return text.to_string();
            }
            let s = *pick(rng, &spans);
            replace_span(text, s, *pick(rng, &NUMBERS))
        }
        6 => {
            let spans = value_spans(text);
            if spans.is_empty() {
                return text.to_string();
            }
            let s = *pick(rng, &spans);
            let v = if rng.random_bool(0.5) { pick(rng, &NUMBERS).to_string() } else { format!(" {}", pick(rng, &VALUES)) };
            replace_span(text, s, &v)
        }
        7 => {
            let spans = string_spans(text);
            if spans.is_empty() {
                return text.to_string();
            }
            let s = *pick(rng, &spans);
            let long = format!("\"{}\"", "a".repeat(rng.random_range(1..5000)));
            let v = if rng.random_bool(0.3) { long } else { pick(rng, &VALUES).to_string() };
            replace_span(text, s, &v)
        }
        _ => {
            let mut b = text.as_bytes().to_vec();
            mutate_bytes(rng, &mut b, &[]);
            String::from_utf8_lossy(&b).into_owned()
        }
    }
}

fn random_json(rng: &mut StdRng, keys: &[String], depth: usize) -> serde_json::Value {
    use serde_json::Value;
    match rng.random_range(0..10) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => Value::from(interesting(rng)),
        3 => Value::from((interesting(rng) as i64).wrapping_abs().wrapping_neg()),
        4 => Value::from(*pick(rng, &[0.0, -0.5, 0.5, 1e-300, 1e300, -1e300, f64::MAX, f64::MIN_POSITIVE, 2.5])),
        5 => Value::String(pick(rng, &["", "x", "cpu", "toy", "DhariwalUNet", "SongUNet", "ToyMLP", "fourier", "skip", "residual", "00000/img00000000.png", "mu"]).to_string()),
        6 if depth < 3 => {
            let len = *pick(rng, &[0usize, 1, 2, 4, 33, 65, 100]);
            let item = random_json(rng, keys, depth + 1);
            Value::Array(vec![item; len])
        }
        7 if depth < 3 && !keys.is_empty() => {
            let mut m = serde_json::Map::new();
            for _ in 0..rng.random_range(0..3) {
                m.insert(pick(rng, keys).clone(), random_json(rng, keys, depth + 1));
            }
            Value::Object(m)
        }
        _ => Value::from(rng.random_range(0..70u64)),
    }
}

/// One structure-aware mutation of a JSON document: a random node replaced, deleted,
/// duplicated or extended, or a known key added.
fn mutate_json(rng: &mut StdRng, node: &mut serde_json::Value, keys: &[String]) {
    use serde_json::Value;
    // Walk down to a random node.
    if rng.random_bool(0.6) {
        match node {
            Value::Array(a) if !a.is_empty() => {
                let i = rng.random_range(0..a.len());
                return mutate_json(rng, &mut a[i], keys);
            }
            Value::Object(o) if !o.is_empty() => {
                let i = rng.random_range(0..o.len());
                return mutate_json(rng, o.values_mut().nth(i).unwrap(), keys);
            }
            _ => {}
        }
    }
    match node {
        Value::Array(a) if rng.random_bool(0.5) => match rng.random_range(0..4) {
            0 if !a.is_empty() => {
                a.remove(rng.random_range(0..a.len()));
            }
            1 if !a.is_empty() => {
                let i = rng.random_range(0..a.len());
                let item = a[i].clone();
                let times = *pick(rng, &[1usize, 2, 40, 70]);
                for _ in 0..times {
                    a.push(item.clone());
                }
            }
            2 if a.len() >= 2 => {
                let n = a.len();
                a.swap(0, n - 1)
            }
            _ => a.push(random_json(rng, keys, 1)),
        },
        Value::Object(o) if rng.random_bool(0.5) => match rng.random_range(0..3) {
            0 if !o.is_empty() => {
                let k = o.keys().nth(rng.random_range(0..o.len())).cloned().unwrap();
                o.remove(&k);
            }
            _ if !keys.is_empty() => {
                o.insert(pick(rng, keys).clone(), random_json(rng, keys, 1));
            }
            _ => {}
        },
        other => *other = random_json(rng, keys, 0),
    }
}

fn json_keys(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                out.push(k.clone());
                json_keys(x, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| json_keys(x, out)),
        _ => {}
    }
}

fn random_toml(rng: &mut StdRng, keys: &[String], depth: usize) -> toml::Value {
    use toml::Value;
    match rng.random_range(0..10) {
        0 => Value::Boolean(rng.random()),
        1 => Value::Integer(interesting(rng) as i64),
        2 => Value::Integer(-(rng.random_range(0..=i64::MAX))),
        3 => Value::Float(*pick(rng, &[0.0, -0.0, -1.0, 1e-310, 1e300, -1e300, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.999999, 1.5])),
        4 => Value::String(
            pick(rng, &["", "x", "cpu", "cuda", "ndarray", "toy", "edm", "idx", "eight_gaussians", "heun", "euler", "l2", "lpips", "none", "pseudo_huber", "dmd", "sigma", "sigma_cubed", "nvidia", "pytorch-fid", "ToyMLP", "SongUNet", "DhariwalUNet", "../x.toml"])
                .to_string(),
        ),
        5 if depth < 3 => {
            let len = *pick(rng, &[0usize, 1, 2, 3, 4, 33, 65, 100]);
            let item = random_toml(rng, keys, depth + 1);
            Value::Array(vec![item; len])
        }
        6 if depth < 3 && !keys.is_empty() => {
            let mut t = toml::Table::new();
            for _ in 0..rng.random_range(0..3) {
                t.insert(pick(rng, keys).clone(), random_toml(rng, keys, depth + 1));
            }
            Value::Table(t)
        }
        _ => Value::Integer(rng.random_range(0..1100)),
    }
}

fn mutate_toml(rng: &mut StdRng, node: &mut toml::Value, keys: &[String]) {
    use toml::Value;
    if rng.random_bool(0.65) {
        match node {
            Value::Array(a) if !a.is_empty() => {
                let i = rng.random_range(0..a.len());
                return mutate_toml(rng, &mut a[i], keys);
            }
            Value::Table(t) if !t.is_empty() => {
                let i = rng.random_range(0..t.len());
                let k = t.keys().nth(i).cloned().unwrap();
                return mutate_toml(rng, t.get_mut(&k).unwrap(), keys);
            }
            _ => {}
        }
    }
    match node {
        Value::Array(a) if rng.random_bool(0.5) => match rng.random_range(0..4) {
            0 if !a.is_empty() => {
                a.remove(rng.random_range(0..a.len()));
            }
            1 if !a.is_empty() => {
                let i = rng.random_range(0..a.len());
                let item = a[i].clone();
                for _ in 0..*pick(rng, &[1usize, 2, 40, 70]) {
                    a.push(item.clone());
                }
            }
            2 if a.len() >= 2 => {
                let n = a.len();
                a.swap(0, n - 1)
            }
            _ => a.push(random_toml(rng, keys, 1)),
        },
        Value::Table(t) if rng.random_bool(0.6) => match rng.random_range(0..3) {
            0 if !t.is_empty() => {
                let k = t.keys().nth(rng.random_range(0..t.len())).cloned().unwrap();
                t.remove(&k);
            }
            _ if !keys.is_empty() => {
                t.insert(pick(rng, keys).clone(), random_toml(rng, keys, 1));
            }
            _ => {}
        },
        Value::Integer(i) if rng.random_bool(0.5) => {
            *i = match rng.random_range(0..4) {
                0 => i.wrapping_neg(),
                1 => i.wrapping_add(1),
                2 => i.wrapping_sub(1),
                _ => i.wrapping_mul(1 << rng.random_range(1..40)),
            }
        }
        other => *other = random_toml(rng, keys, 0),
    }
}

fn toml_keys(v: &toml::Value, out: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, x) in t {
                out.push(k.clone());
                toml_keys(x, out);
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|x| toml_keys(x, out)),
        _ => {}
    }
}

/// A text-config fuzzer: structure-aware TOML/JSON mutations on parsed seeds, then text and
/// byte mutations.
#[derive(Clone, Copy, PartialEq)]
enum Syntax {
    Toml,
    Json,
    /// Line-based text (merges, prompt files): text and byte mutations only.
    Plain,
}

struct TextMutator {
    syntax: Syntax,
    keys: Vec<String>,
    dict: Vec<String>,
}

impl TextMutator {
    fn new(syntax: Syntax, seeds: &[String]) -> Self {
        let mut keys = Vec::new();
        let mut dict = Vec::new();
        for s in seeds {
            match syntax {
                Syntax::Toml => {
                    if let Ok(t) = toml::from_str::<toml::Table>(s) {
                        toml_keys(&toml::Value::Table(t), &mut keys);
                    }
                }
                Syntax::Json => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(s) {
                        json_keys(&v, &mut keys);
                    }
                }
                Syntax::Plain => {}
            }
            dict.extend(s.lines().filter(|l| !l.trim().is_empty()).map(str::to_string));
        }
        keys.sort();
        keys.dedup();
        dict.sort();
        dict.dedup();
        Self { syntax, keys, dict }
    }

    fn mutate(&self, rng: &mut StdRng, text: &str) -> String {
        let mut text = text.to_string();
        if rng.random_bool(0.7) {
            let structured = match self.syntax {
                Syntax::Toml => toml::from_str::<toml::Table>(&text).ok().and_then(|t| {
                    let mut v = toml::Value::Table(t);
                    for _ in 0..mutation_count(rng) {
                        mutate_toml(rng, &mut v, &self.keys);
                    }
                    match v {
                        toml::Value::Table(t) => toml::to_string(&t).ok(),
                        _ => None,
                    }
                }),
                Syntax::Json => serde_json::from_str::<serde_json::Value>(&text).ok().map(|mut v| {
                    for _ in 0..mutation_count(rng) {
                        mutate_json(rng, &mut v, &self.keys);
                    }
                    serde_json::to_string_pretty(&v).unwrap()
                }),
                Syntax::Plain => None,
            };
            if let Some(s) = structured {
                text = s;
            }
        }
        if rng.random_bool(0.5) {
            for _ in 0..mutation_count(rng) {
                text = mutate_text(rng, &text, &self.dict);
            }
        }
        // Configs are small; a huge one only measures the TOML library's memory per value.
        let mut end = text.len().min(MAX_TEXT);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text
    }
}

// ---------------------------------------------------------------------------------------------
// Safetensors

fn safetensors_seed(with_metadata: bool, names: &[&str]) -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let f32s: Vec<u8> = (0..6).flat_map(|i| (i as f32 * 0.5 - 1.0).to_le_bytes()).collect();
    let f64s: Vec<u8> = (0..2).flat_map(|i| (i as f64 + 0.25).to_le_bytes()).collect();
    let f16s: Vec<u8> = (0..4).flat_map(|i| half_bits(i as f32)).collect();
    let i64s: Vec<u8> = (0..2).flat_map(|i: i64| (i - 1).to_le_bytes()).collect();
    let i32s: Vec<u8> = (0..3).flat_map(|i: i32| (i * 7).to_le_bytes()).collect();
    let u8s: Vec<u8> = vec![0, 1, 2, 3, 255];
    let one: Vec<u8> = 3.0f32.to_le_bytes().to_vec();
    let all = [
        (Dtype::F32, vec![2, 3], &f32s),
        (Dtype::F64, vec![2], &f64s),
        (Dtype::F16, vec![4], &f16s),
        (Dtype::BF16, vec![2, 2], &f16s),
        (Dtype::I64, vec![2, 1], &i64s),
        (Dtype::I32, vec![3], &i32s),
        (Dtype::U8, vec![5], &u8s),
        (Dtype::F32, vec![], &one),
        (Dtype::F32, vec![0, 4], &Vec::new()),
    ];
    let views: Vec<(String, TensorView)> = names
        .iter()
        .zip(all.iter())
        .map(|(n, (dt, shape, data))| (n.to_string(), TensorView::new(*dt, shape.clone(), data).unwrap()))
        .collect();
    let meta = with_metadata.then(|| HashMap::from([("format".to_string(), "pt".to_string()), ("sigmas".to_string(), "[80.0, 20.5]".to_string())]));
    safetensors::serialize(views, meta).unwrap()
}

fn half_bits(v: f32) -> [u8; 2] {
    // float16 bits of small integers (exact): sign 0, exponent and mantissa.
    if v == 0.0 {
        return [0, 0];
    }
    let e = v.log2().floor() as i32;
    let m = ((v / 2f32.powi(e) - 1.0) * 1024.0) as u16;
    let bits = (((e + 15) as u16) << 10) | m;
    bits.to_le_bytes()
}

/// Splits a safetensors file into (header JSON, data), if it has that shape.
fn split_safetensors(b: &[u8]) -> Option<(serde_json::Value, Vec<u8>)> {
    let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
    let header = b.get(8..8usize.checked_add(n)?)?;
    let v = serde_json::from_slice(header).ok()?;
    Some((v, b[8 + n..].to_vec()))
}

fn join_safetensors(rng: &mut StdRng, header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    if rng.random_bool(0.3) {
        // safetensors pads the header with spaces to 8 bytes.
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
    }
    let mut len = h.len() as u64;
    if rng.random_bool(0.15) {
        len = match rng.random_range(0..4) {
            0 => interesting(rng),
            1 => len.wrapping_add(rng.random_range(1..9)),
            2 => len.wrapping_sub(rng.random_range(1..9)),
            _ => 100_000_000 - 1,
        };
    }
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// Structure-aware: dtypes, shapes, offsets, metadata, the header length.
fn mutate_safetensors(rng: &mut StdRng, b: &[u8]) -> Vec<u8> {
    use serde_json::{json, Value};
    let Some((mut h, mut data)) = split_safetensors(b) else { return b.to_vec() };
    for _ in 0..mutation_count(rng) {
        let Some(obj) = h.as_object_mut() else { break };
        let names: Vec<String> = obj.keys().cloned().collect();
        if names.is_empty() {
            obj.insert("t".into(), json!({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}));
            continue;
        }
        let name = pick(rng, &names).clone();
        let op = rng.random_range(0..9);
        if op < 4 {
            let Some(t) = obj.get_mut(&name).and_then(|v| v.as_object_mut()) else { continue };
            match op {
                0 => {
                    let dt = *pick(rng, &["F32", "F64", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "F8_E4M3", "F8_E5M2", "F4", "F6_E2M3", "C64", "XX", ""]);
                    t.insert("dtype".into(), json!(dt));
                }
                1 => {
                    let mut s: Vec<Value> = t.get("shape").and_then(|v| v.as_array()).cloned().unwrap_or_default();
                    match rng.random_range(0..4) {
                        0 if !s.is_empty() => {
                            let i = rng.random_range(0..s.len());
                            s[i] = json!(interesting(rng));
                        }
                        1 => s.push(json!(interesting(rng))),
                        2 => s.clear(),
                        _ => s = vec![json!(1); rng.random_range(0..300)],
                    }
                    t.insert("shape".into(), Value::Array(s));
                }
                2 => {
                    let a = interesting(rng);
                    let b = if rng.random_bool(0.5) { interesting(rng) } else { a.wrapping_add(rng.random_range(0..64)) };
                    t.insert("data_offsets".into(), json!([a, b]));
                }
                _ => {
                    if let Some(o) = t.get_mut("data_offsets").and_then(|v| v.as_array_mut()) {
                        o.reverse();
                    }
                }
            }
            continue;
        }
        match op {
            4 => {
                let v = random_json(rng, &["dtype".into(), "shape".into(), "data_offsets".into(), "format".into()], 1);
                obj.insert(name, v);
            }
            5 => {
                let meta = match rng.random_range(0..4) {
                    0 => json!({"a": 1}),
                    1 => json!(["x"]),
                    2 => json!({"x": "y".repeat(rng.random_range(0..10_000))}),
                    _ => json!(null),
                };
                obj.insert("__metadata__".into(), meta);
            }
            6 => {
                obj.remove(&name);
            }
            7 => {
                let v = obj[&name].clone();
                obj.insert(format!("{name}.{}", rng.random_range(0..100)), v);
            }
            _ => {
                // Grow or shrink the data area.
                if rng.random_bool(0.5) {
                    data.truncate(rng.random_range(0..=data.len()));
                } else {
                    data.extend(std::iter::repeat_n(0u8, rng.random_range(1..64)));
                }
            }
        }
    }
    join_safetensors(rng, &h, &data)
}

fn binary_mutator(structure: fn(&mut StdRng, &[u8]) -> Vec<u8>, file: &'static str) -> Box<dyn Fn(&mut StdRng, &[Case]) -> Case + Send> {
    Box::new(move |rng, seeds| {
        let seed = &pick(rng, seeds)[0].1;
        let mut b = if rng.random_bool(0.6) { structure(rng, seed) } else { seed.clone() };
        if rng.random_bool(0.6) {
            let others: Vec<&[u8]> = seeds.iter().map(|c| c[0].1.as_slice()).collect();
            for _ in 0..mutation_count(rng) {
                mutate_bytes(rng, &mut b, &others);
            }
        }
        vec![(file.to_string(), b)]
    })
}

#[test]
fn fuzz_safetensors() {
    let names = ["a.weight", "b.bias", "c", "d", "e", "f", "g", "scalar", "empty"];
    let seeds = vec![
        vec![("w.safetensors".to_string(), safetensors_seed(true, &names))],
        vec![("w.safetensors".to_string(), safetensors_seed(false, &names[..3]))],
        vec![("w.safetensors".to_string(), safetensors_seed(true, &names[..1]))],
    ];
    fuzz(Target {
        name: "safetensors",
        fixed: vec![],
        seeds,
        mutate: binary_mutator(mutate_safetensors, "w.safetensors"),
        exec: Box::new(|dir| {
            let p = dir.join("w.safetensors");
            let bytes = std::fs::read(&p).unwrap();
            let a = NamedTensors::from_bytes(&bytes, "fuzz");
            let b = NamedTensors::read(&p);
            let m = NamedTensors::read_metadata(&p);
            if let Ok(t) = &a {
                for h in t.tensors.values() {
                    // What HostTensor promises.
                    if h.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)) != Some(h.data.len()) {
                        panic!("tensor shape {:?} does not match its {} values", h.shape, h.data.len());
                    }
                }
            }
            match (a, b, m) {
                (Ok(_), Ok(_), Ok(_)) => Ok(()),
                (a, b, m) => Err(format!("{:?} {:?} {:?}", a.err(), b.err(), m.err())),
            }
        }),
    });
}

#[test]
fn fuzz_latents() {
    use safetensors::tensor::{Dtype, TensorView};
    let lat: Vec<u8> = (0..16).flat_map(|i| (i as f32 / 8.0 - 1.0).to_le_bytes()).collect();
    let lab: Vec<u8> = [1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let with_labels = safetensors::serialize(
        vec![
            ("latents".to_string(), TensorView::new(Dtype::F32, vec![2, 2, 2, 2], &lat).unwrap()),
            ("labels".to_string(), TensorView::new(Dtype::F32, vec![2, 3], &lab).unwrap()),
        ],
        None,
    )
    .unwrap();
    let without = safetensors::serialize(vec![("latents".to_string(), TensorView::new(Dtype::F32, vec![2, 2, 2, 2], &lat).unwrap())], None).unwrap();
    fuzz(Target {
        name: "latents",
        fixed: vec![],
        seeds: vec![vec![("z.safetensors".into(), with_labels)], vec![("z.safetensors".into(), without)]],
        mutate: binary_mutator(mutate_safetensors, "z.safetensors"),
        exec: Box::new(|dir| {
            let p = dir.join("z.safetensors");
            let a = read_latents(&p, [2, 2, 2], 3);
            let b = read_latents(&p, [2, 2, 2], 0);
            match (a, b) {
                (Err(a), Err(b)) => Err(format!("{a:#}; {b:#}")),
                _ => Ok(()),
            }
        }),
    });
}

// ---------------------------------------------------------------------------------------------
// .npz (numpy's savez / savez_compressed) and .npy

fn npy(descr: &str, shape: &[usize], data: &[u8], version: u8) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    npy_with_header(&format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"), data, version)
}

fn npy_with_header(dict: &str, data: &[u8], version: u8) -> Vec<u8> {
    let prefix = if version == 1 { 10 } else { 12 };
    let mut header = dict.to_string();
    while (prefix + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn zip_of(entries: &[(String, Vec<u8>)], method: zip::CompressionMethod, zip64: bool) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(method).large_file(zip64);
    for (name, bytes) in entries {
        if z.start_file(name.as_str(), opts).is_err() {
            continue; // a duplicate name: the writer refuses it
        }
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap().into_inner()
}

fn stats_npz(d: usize, f32s: bool, compressed: bool, version: u8) -> Vec<u8> {
    let mu: Vec<f64> = (0..d).map(|i| i as f64 * 0.1).collect();
    let sigma: Vec<f64> = (0..d * d).map(|i| if i % (d + 1) == 0 { 1.0 } else { 0.01 * i as f64 }).collect();
    let (descr, enc): (&str, fn(&[f64]) -> Vec<u8>) = if f32s {
        ("<f4", |v| v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect())
    } else {
        ("<f8", |v| v.iter().flat_map(|x| x.to_le_bytes()).collect())
    };
    let entries = vec![("mu.npy".to_string(), npy(descr, &[d], &enc(&mu), version)), ("sigma.npy".to_string(), npy(descr, &[d, d], &enc(&sigma), version))];
    let method = if compressed { zip::CompressionMethod::Deflated } else { zip::CompressionMethod::Stored };
    // numpy writes its members with zip64 extra fields (force_zip64=True).
    zip_of(&entries, method, !compressed)
}

/// The members of a zip, if it reads.
fn unzip(b: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    use std::io::Read;
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(b)).ok()?;
    let mut out = Vec::new();
    for i in 0..z.len().min(64) {
        let mut f = z.by_index(i).ok()?;
        let mut v = Vec::new();
        (&mut f).take(MAX_INPUT as u64).read_to_end(&mut v).ok()?;
        out.push((f.name().to_string(), v));
    }
    Some(out)
}

/// Rewrites a size, count or offset field of a zip record (local header, central directory,
/// end of central directory).
fn mutate_zip_fields(rng: &mut StdRng, b: &mut [u8]) {
    let sigs: [(&[u8], &[(usize, usize)]); 3] = [
        (b"PK\x03\x04", &[(14, 4), (18, 4), (22, 4), (26, 2), (28, 2), (8, 2), (6, 2)]),
        (b"PK\x01\x02", &[(16, 4), (20, 4), (24, 4), (28, 2), (30, 2), (32, 2), (42, 4), (10, 2)]),
        (b"PK\x05\x06", &[(8, 2), (10, 2), (12, 4), (16, 4), (20, 2)]),
    ];
    let (sig, fields) = *pick(rng, &sigs);
    let at: Vec<usize> = b.windows(4).enumerate().filter(|(_, w)| *w == sig).map(|(i, _)| i).collect();
    if at.is_empty() {
        return;
    }
    let base = *pick(rng, &at);
    let (off, width) = *pick(rng, fields);
    let Some(field) = b.get_mut(base + off..base + off + width) else { return };
    let old = field.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64);
    let v = match rng.random_range(0..4) {
        0 => old.wrapping_add(rng.random_range(1..16)),
        1 => old.wrapping_sub(rng.random_range(1..16)),
        _ => interesting(rng),
    };
    field.copy_from_slice(&v.to_le_bytes()[..width]);
}

/// Many false end-of-central-directory records (the zip crate tries each one), before the
/// real one; the chunk is one the fuzzer found, which sends the crate scanning for each.
fn zip_eocd_candidates(rng: &mut StdRng, b: &mut Vec<u8>) {
    let mut chunk = b"PK\x05\x06\x00\x00\x00\x00py\x01\x00\x10\x00\xa4\x00\x00\x00\x00\x00\x00\x00\xa4\x00\x00\x00\x00\x00\x00\x00".to_vec();
    if rng.random_bool(0.3) {
        for c in chunk[4..].iter_mut() {
            *c = rng.random();
        }
    }
    let n = *pick(rng, &[100usize, 3000, 30_000]);
    let at = b.windows(4).rposition(|w| w == b"PK\x05\x06").unwrap_or(b.len());
    let at = if rng.random_bool(0.5) { at } else { rng.random_range(0..=at) };
    let rep: Vec<u8> = chunk.iter().copied().cycle().take(chunk.len() * n).collect();
    b.splice(at..at, rep);
    b.truncate(MAX_INPUT);
}

/// Structure-aware: npy headers (descr, shape, fortran_order, length, version, nesting),
/// members renamed, dropped or duplicated, stored or deflated, zip fields.
fn mutate_npz(rng: &mut StdRng, b: &[u8]) -> Vec<u8> {
    let Some(mut members) = unzip(b) else { return b.to_vec() };
    for _ in 0..mutation_count(rng) {
        if members.is_empty() {
            break;
        }
        let i = rng.random_range(0..members.len());
        match rng.random_range(0..8) {
            0..=3 => {
                let data_len = members[i].1.len().saturating_sub(128);
                let data = members[i].1[members[i].1.len() - data_len..].to_vec();
                let descr = *pick(rng, &["<f8", "<f4", ">f8", ">f4", "<f2", "|u1", "<i8", "<c16", "|b1", "O", "<U3", "|S4", "<M8[s]", "V8", "<f16"]);
                let dims: Vec<String> = (0..*pick(rng, &[0usize, 1, 1, 2, 2, 3, 40]))
                    .map(|_| match rng.random_range(0..3) {
                        0 => interesting(rng).to_string(),
                        1 => rng.random_range(0..5).to_string(),
                        _ => pick(rng, &["-1", "2.0", "'a'", "None", "99999999999999999999999", "(2,)", "[3]"]).to_string(),
                    })
                    .collect();
                let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
                let descr_v = if rng.random_bool(0.1) { format!("[('a', '{descr}'), ('b', '<f8', (2, 3))]") } else { format!("'{descr}'") };
                let descr_v = if rng.random_bool(0.05) { format!("('<f8', ({}, {}))", interesting(rng), interesting(rng)) } else { descr_v };
                let fortran = *pick(rng, &["False", "True", "1", "None", "'no'"]);
                let mut dict = format!("{{'descr': {descr_v}, 'fortran_order': {fortran}, 'shape': {shape}, }}");
                if rng.random_bool(0.1) {
                    // Deeply nested literal.
                    let depth = *pick(rng, &[50usize, 1000, 20_000]);
                    dict = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {}(1,){}, }}", "(".repeat(depth), ")".repeat(depth));
                }
                let version = *pick(rng, &[1u8, 1, 2, 3, 0, 9]);
                members[i].1 = npy_with_header(&dict, &data, version);
            }
            4 => {
                // The header length field.
                if members[i].1.len() >= 12 {
                    let v = interesting(rng);
                    let m = &mut members[i].1;
                    if m[6] == 1 {
                        m[8..10].copy_from_slice(&(v as u16).to_le_bytes());
                    } else {
                        m[8..12].copy_from_slice(&(v as u32).to_le_bytes());
                    }
                }
            }
            5 => members[i].0 = pick(rng, &["mu.npy", "sigma.npy", "mu", "x.npy", "", "mu.npy/", "../mu.npy"]).to_string(),
            6 => {
                let m = members[i].clone();
                members.push(m);
            }
            _ => {
                members.remove(i);
            }
        }
    }
    let method = if rng.random_bool(0.5) { zip::CompressionMethod::Stored } else { zip::CompressionMethod::Deflated };
    let mut out = zip_of(&members, method, rng.random_bool(0.5));
    if rng.random_bool(0.3) {
        mutate_zip_fields(rng, &mut out);
    }
    if rng.random_bool(0.01) {
        zip_eocd_candidates(rng, &mut out);
    }
    out
}

#[test]
fn fuzz_npz() {
    let mut seeds = Vec::new();
    for (f32s, compressed, version, d) in [(false, false, 1, 4), (true, false, 1, 3), (false, true, 1, 2), (true, true, 2, 4), (false, false, 2, 1)] {
        seeds.push(vec![("stats.npz".to_string(), stats_npz(d, f32s, compressed, version))]);
    }
    fuzz(Target {
        name: "npz",
        fixed: vec![],
        seeds,
        mutate: binary_mutator(mutate_npz, "stats.npz"),
        exec: Box::new(|dir| FidStats::read_npz(&dir.join("stats.npz")).map(|_| ()).map_err(|e| format!("{e:#}"))),
    });
}

// ---------------------------------------------------------------------------------------------
// IDX (MNIST), raw and gzipped

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn gunzip(b: &[u8]) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b).take(MAX_INPUT as u64).read_to_end(&mut out).ok()?;
    Some(out)
}

/// A gzip bomb: a tiny header declaring 16 bytes, followed by `mib` MiB of zeros.
fn idx_bomb(mib: usize) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(&idx(&[16], &[7; 16])).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..mib {
        e.write_all(&zeros).unwrap();
    }
    e.finish().unwrap()
}

/// Structure-aware: ndim and dims rewritten, data grown or cut, gzip on or off.
fn mutate_idx(rng: &mut StdRng, b: &[u8]) -> Vec<u8> {
    let gz = b.starts_with(&[0x1f, 0x8b]);
    let Some(mut raw) = (if gz { gunzip(b) } else { Some(b.to_vec()) }) else { return b.to_vec() };
    for _ in 0..mutation_count(rng) {
        if raw.len() < 4 {
            break;
        }
        let ndim = raw[3] as usize;
        match rng.random_range(0..5) {
            0 => raw[3] = *pick(rng, &[0u8, 1, 2, 3, 4, 8, 16, 64, 255]),
            1 | 2 if ndim > 0 => {
                let i = rng.random_range(0..ndim);
                let v = match rng.random_range(0..3) {
                    0 => interesting(rng) as u32,
                    1 => rng.random_range(0..70),
                    _ => u32::MAX / rng.random_range(1..70),
                };
                if let Some(f) = raw.get_mut(4 + 4 * i..8 + 4 * i) {
                    f.copy_from_slice(&v.to_be_bytes());
                }
            }
            3 => raw[2] = *pick(rng, &[0x08u8, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0]),
            _ => {
                if rng.random_bool(0.5) {
                    raw.truncate(rng.random_range(0..=raw.len()));
                } else {
                    raw.extend(std::iter::repeat_n(1u8, rng.random_range(1..100)));
                }
            }
        }
    }
    let gz_out = if rng.random_bool(0.1) { !gz } else { gz };
    if gz_out {
        gzip(&raw)
    } else {
        raw
    }
}

#[test]
fn fuzz_idx() {
    let images = idx(&[3, 4, 5], &(0..60).map(|i| (i * 4) as u8).collect::<Vec<_>>());
    let labels = idx(&[3], &[1, 9, 0]);
    let bomb = idx_bomb(96);
    let seeds = vec![
        vec![("images".to_string(), images.clone()), ("labels".to_string(), labels.clone())],
        vec![("images".to_string(), gzip(&images)), ("labels".to_string(), gzip(&labels))],
        vec![("images".to_string(), gzip(&images)), ("labels".to_string(), labels.clone())],
        vec![("images".to_string(), idx(&[0, 2, 2], &[])), ("labels".to_string(), idx(&[0], &[]))],
    ];
    // The bomb is a valid IDX header with too much data: an error, never a 96 MiB buffer.
    let bombs = vec![vec![("images".to_string(), bomb.clone()), ("labels".to_string(), labels.clone())], vec![("images".to_string(), images.clone()), ("labels".to_string(), bomb)]];
    let all_seeds = seeds.clone();
    fuzz(Target {
        name: "idx",
        fixed: vec![],
        seeds,
        mutate: Box::new(move |rng, seeds| {
            if rng.random_bool(0.02) {
                return pick(rng, &bombs).clone();
            }
            let mut case = pick(rng, seeds).clone();
            let others: Vec<&[u8]> = all_seeds.iter().flat_map(|c| c.iter().map(|(_, b)| b.as_slice())).collect();
            for file in case.iter_mut() {
                if rng.random_bool(0.5) {
                    continue;
                }
                if rng.random_bool(0.6) {
                    file.1 = mutate_idx(rng, &file.1);
                }
                if rng.random_bool(0.5) {
                    for _ in 0..mutation_count(rng) {
                        mutate_bytes(rng, &mut file.1, &others);
                    }
                }
            }
            case
        }),
        exec: Box::new(|dir| {
            let (images, labels) = (dir.join("images"), dir.join("labels"));
            let a = read_idx(&images);
            let _ = read_idx(&labels);
            let ds = ImageDataset::from_idx(&images, Some(&labels), 10);
            if let Ok(ds) = &ds {
                for i in 0..ds.len().min(100) {
                    let _ = ds.image(i);
                    let _ = ds.label(i);
                }
            }
            a.map(|_| ()).map_err(|e| e.to_string())
        }),
    });
}

// ---------------------------------------------------------------------------------------------
// EDM dataset zips: PNGs and dataset.json

fn png(w: u32, h: u32, color: image::ExtendedColorType, seed: u8) -> Vec<u8> {
    use image::ImageEncoder;
    let bytes_per_px = match color {
        image::ExtendedColorType::L8 => 1,
        image::ExtendedColorType::La8 => 2,
        image::ExtendedColorType::Rgb8 => 3,
        image::ExtendedColorType::Rgba8 => 4,
        image::ExtendedColorType::L16 => 2,
        image::ExtendedColorType::Rgb16 => 6,
        _ => unreachable!(),
    };
    let data: Vec<u8> = (0..(w * h) as usize * bytes_per_px).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out).write_image(&data, w, h, color).unwrap();
    out
}

fn png_chunks(b: &[u8]) -> Option<Vec<([u8; 4], Vec<u8>)>> {
    if b.len() < 8 || &b[..8] != b"\x89PNG\r\n\x1a\n" {
        return None;
    }
    let mut out = Vec::new();
    let mut i = 8;
    while i + 12 <= b.len() {
        let len = u32::from_be_bytes(b[i..i + 4].try_into().unwrap()) as usize;
        let kind: [u8; 4] = b[i + 4..i + 8].try_into().unwrap();
        let data = b.get(i + 8..i + 8 + len)?.to_vec();
        out.push((kind, data));
        i += 12 + len;
    }
    Some(out)
}

fn png_join(chunks: &[([u8; 4], Vec<u8>)], fix_crc: bool) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in chunks {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        let sum = if fix_crc { crc.sum() } else { crc.sum() ^ 1 };
        out.extend_from_slice(&sum.to_be_bytes());
    }
    out
}

/// Structure-aware PNG mutations: IHDR fields (width, height, depth, color type, interlace),
/// chunks dropped, duplicated or cut, valid CRCs (so the decoder looks past them).
fn mutate_png(rng: &mut StdRng, b: &[u8]) -> Vec<u8> {
    let Some(mut chunks) = png_chunks(b) else { return b.to_vec() };
    for _ in 0..mutation_count(rng) {
        if chunks.is_empty() {
            break;
        }
        match rng.random_range(0..6) {
            0 | 1 => {
                if let Some((_, ihdr)) = chunks.iter_mut().find(|(k, _)| k == b"IHDR") {
                    if ihdr.len() >= 13 {
                        match rng.random_range(0..5) {
                            0 => ihdr[0..4].copy_from_slice(&(interesting(rng) as u32).to_be_bytes()),
                            1 => ihdr[4..8].copy_from_slice(&(interesting(rng) as u32).to_be_bytes()),
                            2 => ihdr[8] = *pick(rng, &[1u8, 2, 4, 8, 16, 0, 3]),
                            3 => ihdr[9] = *pick(rng, &[0u8, 2, 3, 4, 6, 1, 7]),
                            _ => ihdr[12] = rng.random_range(0..3),
                        }
                    }
                }
            }
            2 => {
                let i = rng.random_range(0..chunks.len());
                let c = chunks[i].clone();
                chunks.insert(i, c);
            }
            3 => {
                chunks.remove(rng.random_range(0..chunks.len()));
            }
            4 => {
                let i = rng.random_range(0..chunks.len());
                let n = chunks[i].1.len();
                chunks[i].1.truncate(rng.random_range(0..=n));
            }
            _ => {
                let i = rng.random_range(0..chunks.len());
                mutate_bytes(rng, &mut chunks[i].1, &[]);
            }
        }
    }
    png_join(&chunks, rng.random_bool(0.9))
}

fn dataset_zip(images: &[(String, Vec<u8>)], labels: Option<&str>, method: zip::CompressionMethod) -> Vec<u8> {
    let mut entries: Vec<(String, Vec<u8>)> = images.to_vec();
    if let Some(l) = labels {
        entries.push(("dataset.json".into(), l.as_bytes().to_vec()));
    }
    zip_of(&entries, method, false)
}

fn mutate_dataset_zip(rng: &mut StdRng, b: &[u8], json: &TextMutator) -> Vec<u8> {
    let Some(mut members) = unzip(b) else { return b.to_vec() };
    for _ in 0..mutation_count(rng) {
        if members.is_empty() {
            break;
        }
        let i = rng.random_range(0..members.len());
        match rng.random_range(0..7) {
            0..=2 => {
                if members[i].0 == "dataset.json" {
                    let text = String::from_utf8_lossy(&members[i].1).into_owned();
                    members[i].1 = json.mutate(rng, &text).into_bytes();
                } else {
                    members[i].1 = mutate_png(rng, &members[i].1);
                }
            }
            3 => members[i].0 = pick(rng, &["00000/img00000000.png", "a.PNG", "x.txt", "dataset.json", "../a.png", "00000/", "b.jpg", "c.webp", "d.bmp"]).to_string(),
            4 => {
                let m = members[i].clone();
                let name = format!("00001/img{:08}.png", rng.random_range(0..1000));
                members.push((name, m.1));
            }
            5 => {
                members.remove(i);
            }
            _ => {
                let (w, h) = (rng.random_range(1..12), rng.random_range(1..12));
                let color = *pick(rng, &[image::ExtendedColorType::L8, image::ExtendedColorType::La8, image::ExtendedColorType::Rgb8, image::ExtendedColorType::Rgba8, image::ExtendedColorType::L16, image::ExtendedColorType::Rgb16]);
                members.push((format!("00000/img{:08}.png", rng.random_range(0..6)), png(w, h, color, rng.random())));
            }
        }
    }
    let method = if rng.random_bool(0.5) { zip::CompressionMethod::Stored } else { zip::CompressionMethod::Deflated };
    let mut out = zip_of(&members, method, rng.random_bool(0.2));
    if rng.random_bool(0.3) {
        mutate_zip_fields(rng, &mut out);
    }
    if rng.random_bool(0.01) {
        zip_eocd_candidates(rng, &mut out);
    }
    out
}

#[test]
fn fuzz_dataset_zip() {
    use image::ExtendedColorType as C;
    let rgb: Vec<(String, Vec<u8>)> = (0..3).map(|i| (format!("00000/img{i:08}.png"), png(8, 8, C::Rgb8, i as u8 * 50))).collect();
    let gray: Vec<(String, Vec<u8>)> = (0..2).map(|i| (format!("00000/img{i:08}.png"), png(4, 4, C::L8, i as u8))).collect();
    let mixed = vec![("00000/img00000000.png".to_string(), png(6, 6, C::Rgba8, 1)), ("00000/img00000001.png".to_string(), png(6, 6, C::Rgb16, 2))];
    let labels = r#"{"labels": [["00000/img00000000.png", 2], ["00000/img00000001.png", 0], ["00000/img00000002.png", 5]]}"#;
    let labels2 = r#"{"labels": [["00000/img00000000.png", 1], ["00000/img00000001.png", 0]]}"#;
    let seeds: Vec<Case> = vec![
        dataset_zip(&rgb, Some(labels), zip::CompressionMethod::Stored),
        dataset_zip(&rgb, Some(labels), zip::CompressionMethod::Deflated),
        dataset_zip(&gray, Some(r#"{"labels": null}"#), zip::CompressionMethod::Stored),
        dataset_zip(&gray, None, zip::CompressionMethod::Deflated),
        dataset_zip(&mixed, Some(labels2), zip::CompressionMethod::Stored),
    ]
    .into_iter()
    .map(|z| vec![("data.zip".to_string(), z)])
    .collect();
    let json = TextMutator::new(Syntax::Json, &[labels.to_string(), labels2.to_string()]);
    fuzz(Target {
        name: "dataset_zip",
        fixed: vec![],
        seeds,
        mutate: Box::new(move |rng, seeds| {
            let seed = &pick(rng, seeds)[0].1;
            let mut b = if rng.random_bool(0.7) { mutate_dataset_zip(rng, seed, &json) } else { seed.clone() };
            if rng.random_bool(0.4) {
                let others: Vec<&[u8]> = seeds.iter().map(|c| c[0].1.as_slice()).collect();
                for _ in 0..mutation_count(rng) {
                    mutate_bytes(rng, &mut b, &others);
                }
            }
            vec![("data.zip".to_string(), b)]
        }),
        exec: Box::new(|dir| {
            let ds = ImageDataset::open(&dir.join("data.zip")).map_err(|e| e.to_string())?;
            for i in 0..ds.len().min(200) {
                let _ = ds.image(i);
                let _ = ds.label(i);
            }
            Ok(())
        }),
    });
}

// ---------------------------------------------------------------------------------------------
// Pairs folders (pairs.json + safetensors shards)

#[test]
fn fuzz_pairs() {
    use safetensors::tensor::{Dtype, TensorView};
    let shard = |n: usize, labels: bool| {
        let lat: Vec<u8> = (0..n * 2).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let lab: Vec<u8> = (0..n * 3).flat_map(|i| ((i % 3 == 0) as u8 as f32).to_le_bytes()).collect();
        let mut v = vec![
            ("latents".to_string(), TensorView::new(Dtype::F32, vec![n, 2, 1, 1], &lat).unwrap()),
            ("images".to_string(), TensorView::new(Dtype::F32, vec![n, 2, 1, 1], &lat).unwrap()),
        ];
        if labels {
            v.push(("labels".to_string(), TensorView::new(Dtype::F32, vec![n, 3], &lab).unwrap()));
        }
        safetensors::serialize(v, None).unwrap()
    };
    let manifest = |label_dim: usize| {
        format!(r#"{{"teacher": "t.safetensors", "num": 5, "steps": 18, "seed": 0, "shard_size": 3, "image_shape": [2, 1, 1], "label_dim": {label_dim}}}"#).into_bytes()
    };
    let seeds: Vec<Case> = vec![
        vec![("pairs.json".into(), manifest(0)), ("pairs-000000.safetensors".into(), shard(3, false)), ("pairs-000001.safetensors".into(), shard(2, false))],
        vec![("pairs.json".into(), manifest(3)), ("pairs-000000.safetensors".into(), shard(3, true)), ("pairs-000001.safetensors".into(), shard(2, true))],
    ];
    let json = TextMutator::new(Syntax::Json, &[String::from_utf8(manifest(3)).unwrap()]);
    fuzz(Target {
        name: "pairs",
        fixed: vec![],
        seeds,
        mutate: Box::new(move |rng, seeds| {
            let mut case = pick(rng, seeds).clone();
            let i = rng.random_range(0..case.len());
            if i == 0 {
                case[0].1 = json.mutate(rng, &String::from_utf8_lossy(&case[0].1)).into_bytes();
            } else {
                let b = &case[i].1;
                let mut b = if rng.random_bool(0.7) { mutate_safetensors(rng, b) } else { b.clone() };
                if rng.random_bool(0.4) {
                    mutate_bytes(rng, &mut b, &[]);
                }
                case[i].1 = b;
            }
            if rng.random_bool(0.1) {
                case.remove(rng.random_range(1..case.len()));
            }
            case
        }),
        exec: Box::new(|dir| {
            let p = Pairs::load(dir).map_err(|e| format!("{e:#}"))?;
            let _ = (p.len(), p.latents.data.len(), p.images.shape.clone());
            Ok(())
        }),
    });
}

// ---------------------------------------------------------------------------------------------
// Configs: network JSON, train-teacher, distill and experiment TOML

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read_repo(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every file under experiments/configs, for the configs that name others by path.
fn config_tree() -> Case {
    fn walk(root: &Path, dir: &Path, out: &mut Case) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.extension().is_some_and(|x| x == "toml" || x == "json") {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    let root = repo("experiments/configs");
    walk(&root, &root, &mut out);
    out.sort();
    out
}

fn text_target(name: &'static str, syntax: Syntax, fixed: Case, seeds: Vec<Case>, exec: Box<dyn Fn(&Path) -> Result<(), String> + Send>) {
    let texts: Vec<String> = seeds.iter().flat_map(|c| c.iter().map(|(_, b)| String::from_utf8_lossy(b).into_owned())).collect();
    let mutator = TextMutator::new(syntax, &texts);
    fuzz(Target {
        name,
        fixed,
        seeds,
        mutate: Box::new(move |rng, seeds| {
            let mut case = pick(rng, seeds).clone();
            // Mostly the first file (the config itself), sometimes the ones it names.
            let i = if rng.random_bool(0.85) { 0 } else { rng.random_range(0..case.len()) };
            let text = String::from_utf8_lossy(&case[i].1).into_owned();
            let mut out = mutator.mutate(rng, &text).into_bytes();
            if rng.random_bool(0.1) {
                let others: Vec<&[u8]> = seeds.iter().map(|c| c[0].1.as_slice()).collect();
                mutate_bytes(rng, &mut out, &others);
            }
            case[i].1 = out;
            case
        }),
        exec,
    });
}

#[test]
fn fuzz_network_json() {
    let mut texts: Vec<String> = ["adm_imagenet64.json", "adm_tiny.json", "ddpmpp_tiny.json"].iter().map(|f| read_repo(&format!("experiments/configs/networks/{f}"))).collect();
    for json in [
        r#"{"img_resolution": 16, "img_channels": 3, "model_type": "DhariwalUNet", "label_dim": 10}"#,
        r#"{"img_resolution": 32, "img_channels": 3, "model_type": "SongUNet", "embedding_type": "fourier", "encoder_type": "residual", "decoder_type": "skip", "channel_mult_noise": 2}"#,
        r#"{"img_resolution": 1, "img_channels": 2, "model_type": "ToyMLP"}"#,
    ] {
        // Every key, defaults resolved.
        texts.push(EdmConfig::from_json_str(json).unwrap().resolved().to_json());
    }
    let seeds: Vec<Case> = texts.into_iter().map(|t| vec![("net.json".to_string(), t.into_bytes())]).collect();
    text_target(
        "network_json",
        Syntax::Json,
        vec![],
        seeds,
        Box::new(|dir| {
            let p = dir.join("net.json");
            let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned();
            let a = EdmConfig::from_json_str(&text);
            let b = EdmConfig::from_json_file(&p);
            if let Ok(c) = &a {
                // What a valid config promises: it resolves and round-trips.
                let r = c.resolved();
                let again = EdmConfig::from_json_str(&r.to_json()).unwrap_or_else(|e| panic!("a valid config's resolved form does not load: {e}"));
                let _ = (again.channel_mult(), c.model_type == ModelType::ToyMLP);
            }
            match (a, b) {
                (Ok(_), Ok(_)) => Ok(()),
                (a, b) => Err(format!("{:?} {:?}", a.err(), b.err())),
            }
        }),
    );
}

#[test]
fn fuzz_teacher_config() {
    let mut seeds: Vec<Case> = Vec::new();
    for f in ["toy_8gaussians.toml", "toy_8gaussians_cond.toml", "fashion_mnist_16.toml", "fashion_mnist_ddpmpp.toml"] {
        let text = read_repo(&format!("experiments/configs/teacher/{f}"));
        seeds.push(vec![("teacher.toml".to_string(), text.clone().into_bytes())]);
        // Every key, as the product writes it back.
        let cfg: TeacherConfig = toml::from_str(&text).unwrap();
        seeds.push(vec![("teacher.toml".to_string(), toml::to_string(&cfg).unwrap().into_bytes())]);
    }
    text_target(
        "teacher_config",
        Syntax::Toml,
        vec![],
        seeds,
        Box::new(|dir| {
            let cfg = TeacherConfig::from_file(&dir.join("teacher.toml")).map_err(|e| format!("{e:#}"))?;
            // With built-in data the network config is resolved as training does.
            if let DataConfig::Toy { .. } = &cfg.data {
                if let Ok(data) = DataSource::open(&cfg.data) {
                    let _ = cfg.network_config(&data);
                }
            }
            Ok(())
        }),
    );
}

#[test]
fn fuzz_distill_config() {
    let mut seeds: Vec<Case> = Vec::new();
    // Standalone distill configs: what every experiment resolves to (all keys written).
    for rel in ["toy/eight_gaussians_dmd.toml", "toy/eight_gaussians_dmd2_4step.toml", "toy/eight_gaussians_dmd2.toml", "cifar10/dmd_cond.toml", "imagenet64/dmd2.toml", "fashion_mnist/dmd.toml"] {
        let exp = ExperimentConfig::load(&repo(&format!("experiments/configs/{rel}")), &[]).unwrap();
        let d = exp.distill_config().unwrap();
        seeds.push(vec![("distill.toml".to_string(), toml::to_string(&d).unwrap().into_bytes())]);
    }
    text_target(
        "distill_config",
        Syntax::Toml,
        vec![],
        seeds,
        Box::new(|dir| DistillConfig::from_file(&dir.join("distill.toml")).map(|_| ()).map_err(|e| format!("{e:#}"))),
    );
}

#[test]
fn fuzz_experiment_config() {
    let tree = config_tree();
    let by_name: BTreeMap<String, Vec<u8>> = tree.iter().cloned().collect();
    let mut seeds: Vec<Case> = Vec::new();
    for rel in [
        "toy/eight_gaussians_dmd.toml",
        "toy/eight_gaussians_dmd2.toml",
        "toy/eight_gaussians_dmd2_4step_no_backsim.toml",
        "cifar10/dmd_uncond.toml",
        "imagenet64/dmd2_stage2.toml",
        "fashion_mnist/no_regression.toml",
    ] {
        // The config under test sits beside its original (same folder, so `base` and
        // `teacher.train` resolve); then the files it names, then the overrides.
        let folder = rel.rsplit_once('/').unwrap().0;
        let text = by_name[rel].clone();
        let mut case: Case = vec![(format!("{folder}/fuzz.toml"), text.clone()), ("overrides.txt".to_string(), Vec::new())];
        for line in String::from_utf8_lossy(&text).lines() {
            for key in ["base", "train"] {
                if let Some(v) = line.strip_prefix(key).and_then(|l| l.trim().strip_prefix('=')) {
                    let named = format!("{folder}/{}", v.trim().trim_matches('"'));
                    let named = named.replace("toy/../", "").replace("fashion_mnist/../", "");
                    if let Some(b) = by_name.get(&named) {
                        case.push((named, b.clone()));
                    }
                }
            }
        }
        seeds.push(case);
    }
    // Overrides as `dmd run --set` passes them.
    seeds[0][1].1 = b"distill.train.batch_size=2\neval.num_samples=10\nteacher.train.train.total_steps=3".to_vec();
    text_target(
        "experiment_config",
        Syntax::Toml,
        tree,
        seeds,
        Box::new(|dir| {
            let overrides: Vec<String> = String::from_utf8_lossy(&std::fs::read(dir.join("overrides.txt")).unwrap_or_default()).lines().map(str::to_string).collect();
            let main = ["toy", "cifar10", "imagenet64", "fashion_mnist"].iter().map(|f| dir.join(f).join("fuzz.toml")).find(|p| p.exists()).unwrap();
            let cfg = ExperimentConfig::load(&main, &overrides).map_err(|e| format!("{e:#}"))?;
            let _ = (cfg.work_dir(), cfg.results_dir(), cfg.teacher_weights(), cfg.pairs_dir());
            Ok(())
        }),
    );
}

// ---------------------------------------------------------------------------------------------
// Stable Diffusion: the CLIP tokenizer's files and the text it encodes, the configs of a
// diffusers folder (UNet, VAE, CLIP text encoder, scheduler), text-to-image distill TOML and
// prompt files. The real tokenizer and configs of `$DMD_REFERENCE_DIR/sd` (default
// ../shared/reference/sd) join the seeds when present; the synthetic seeds alone run without.

fn sd_reference() -> Option<PathBuf> {
    let root = std::env::var_os("DMD_REFERENCE_DIR").map(PathBuf::from).unwrap_or_else(|| repo("../shared/reference"));
    let dir = root.join("sd");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("note: {} not found: the SD fuzz targets start from synthetic seeds only", dir.display());
        None
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The CPU device the network constructors run on.
fn cpu() -> burn::tensor::Device {
    burn::tensor::Device::flex()
}

/// GPT-2's byte -> printable character table: how CLIP's vocabulary spells single bytes.
fn byte_symbols() -> Vec<String> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut next = 256u32;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).unwrap().to_string()
        })
        .collect()
}

/// A tokenizer folder's `vocab.json` (one entry per line, so that line mutations act on
/// entries) and `merges.txt`.
fn tokenizer_files(vocab: &[(String, u32)], merges: &[String]) -> Case {
    let map: serde_json::Map<String, serde_json::Value> = vocab.iter().map(|(t, i)| (t.clone(), serde_json::Value::from(*i))).collect();
    let json = serde_json::to_string_pretty(&serde_json::Value::Object(map)).unwrap();
    let merges = format!("#version: 0.2\n{}\n", merges.join("\n"));
    vec![("tokenizer/vocab.json".into(), json.into_bytes()), ("tokenizer/merges.txt".into(), merges.into_bytes())]
}

/// A small tokenizer of its own: the 512 byte symbols (plain and word-final), a few merges,
/// the start and end tokens.
fn synthetic_tokenizer() -> Case {
    let syms = byte_symbols();
    let mut vocab: Vec<String> = syms.clone();
    vocab.extend(syms.iter().map(|s| format!("{s}</w>")));
    let pairs = [
        ("t", "h"),
        ("th", "e</w>"),
        ("a", "n"),
        ("an", "d</w>"),
        ("i", "n"),
        ("in", "g</w>"),
        ("o", "f</w>"),
        ("a", "t</w>"),
        ("c", "at</w>"),
        ("d", "o"),
        ("do", "g</w>"),
        ("a", "a"),
        ("aa", "aa"),
        ("Ã", "©</w>"),
        ("'", "s</w>"),
    ];
    let mut merges = Vec::new();
    for (a, b) in pairs {
        merges.push(format!("{a} {b}"));
        vocab.push(format!("{a}{b}"));
    }
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    let entries: Vec<(String, u32)> = vocab.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
    tokenizer_files(&entries, &merges)
}

/// The real tokenizer cut to its byte symbols, its first `n` merges (merge i made id 512 + i)
/// and the start and end tokens (renumbered to follow): consistent, and small enough to load
/// in a millisecond.
fn reference_tokenizer_subset(dir: &Path, n: usize) -> Option<Case> {
    let vocab: HashMap<String, u32> = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer/vocab.json")).ok()?).ok()?;
    let merges: Vec<String> = std::fs::read_to_string(dir.join("tokenizer/merges.txt")).ok()?.lines().skip(1).take(n).map(str::to_string).collect();
    let keep = 512 + n as u32;
    let mut entries: Vec<(String, u32)> = vocab.into_iter().filter(|(_, i)| *i < keep).collect();
    entries.sort_by_key(|e| e.1);
    // Start and end follow (ids number the tokens).
    entries.extend([("<|startoftext|>".to_string(), keep), ("<|endoftext|>".to_string(), keep + 1)]);
    Some(tokenizer_files(&entries, &merges))
}

/// What `encode` promises for any text: 77 ids, the start token first, the end token last.
fn check_encoding(tok: &ClipTokenizer, text: &str) {
    let ids = tok.encode(text);
    assert_eq!(ids.len(), MAX_LENGTH, "encode gave {} ids", ids.len());
    assert!(ids[0] == tok.start_id() && ids[MAX_LENGTH - 1] == tok.end_id(), "encode: ids {ids:?} do not start with start and end with end");
    // The text encoder's table has a row per token: every id must have one.
    assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()), "encode: an id of {ids:?} is not below the {} tokens", tok.vocab_size());
}

const PROBE_PROMPTS: [&str; 6] = ["a photo of a cat", "", "Café déjà vu — naïve!", "the dog's <|endoftext|> x<|startoftext|>", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "😀 中文 한국어 ﻿\u{0}"];

/// Replacement lines for merges.txt: malformed, unknown or special tokens, repeats.
const ODD_MERGES: [&str; 18] = [
    "",
    "#version: 0.2",
    "a",
    "a b c",
    " a",
    "a ",
    "a  b",
    "a\tb",
    "q z",
    "t h",
    "th e</w>",
    "e</w> a",
    "<|startoftext|> <|endoftext|>",
    "<|endoftext|> a",
    "\u{feff}t h",
    "Ġ Ġ",
    "ðŁ ĺ",
    "a </w>",
];

fn mutate_vocab(rng: &mut StdRng, b: &[u8], json: &TextMutator) -> Vec<u8> {
    use serde_json::Value;
    let text = lossy(b);
    if rng.random_bool(0.5) {
        if let Ok(Value::Object(mut m)) = serde_json::from_str::<Value>(&text) {
            for _ in 0..mutation_count(rng) {
                if m.is_empty() {
                    break;
                }
                let k = m.keys().nth(rng.random_range(0..m.len())).cloned().unwrap();
                match rng.random_range(0..6) {
                    // A byte symbol, a merge product or a special token gone.
                    0 => {
                        m.remove(&k);
                    }
                    // An id that is no u32.
                    1 => {
                        let v = pick(rng, &[Value::from(-1), Value::from(4_294_967_296u64), Value::from(1.5), Value::from("7"), Value::Null, Value::from(u32::MAX), Value::from(u64::MAX), Value::Bool(true), Value::Array(vec![])]).clone();
                        m.insert(k, v);
                    }
                    // Another entry's id (two tokens, one id).
                    2 => {
                        let other = m.values().nth(rng.random_range(0..m.len())).cloned().unwrap();
                        m.insert(k, other);
                    }
                    // Odd new tokens.
                    3 => {
                        let t = pick(rng, &["", " ", "a b", "</w>", "<|endoftext|>x", "\u{0}", "\n", "x</w></w>"]).to_string();
                        m.insert(t, Value::from(rng.random_range(0..60_000u32)));
                    }
                    4 => {
                        let v = m.remove(&k).unwrap();
                        m.insert(format!("{k}x"), v);
                    }
                    _ => {
                        m.insert(k, Value::from(interesting(rng)));
                    }
                }
            }
            return serde_json::to_string_pretty(&Value::Object(m)).unwrap().into_bytes();
        }
    }
    json.mutate(rng, &text).into_bytes()
}

fn mutate_merges(rng: &mut StdRng, b: &[u8], plain: &TextMutator) -> Vec<u8> {
    let text = lossy(b);
    if rng.random_bool(0.5) {
        let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
        for _ in 0..mutation_count(rng) {
            let n = lines.len();
            let i = rng.random_range(0..n);
            match rng.random_range(0..6) {
                0 => lines[i] = pick(rng, &ODD_MERGES).to_string(),
                // A repeated merge.
                1 => {
                    let l = lines[rng.random_range(0..n)].clone();
                    lines.insert(rng.random_range(0..=n), l);
                }
                // A merge gone while its product stays in the vocabulary.
                2 if n > 1 => {
                    lines.remove(i);
                }
                // Ranks reordered.
                3 => lines.swap(i, rng.random_range(0..n)),
                4 => lines[i].push('\r'),
                _ => {
                    let sep = *pick(rng, &["", "  ", "\t", " x ", "\u{a0}"]);
                    lines[i] = lines[i].replacen(' ', sep, 1);
                }
            }
        }
        return lines.join("\n").into_bytes();
    }
    plain.mutate(rng, &text).into_bytes()
}

#[test]
fn fuzz_sd_tokenizer() {
    let mut seeds = vec![synthetic_tokenizer()];
    if let Some(c) = sd_reference().and_then(|d| reference_tokenizer_subset(&d, 1500)) {
        seeds.push(c);
    }
    let vocabs: Vec<String> = seeds.iter().map(|c| lossy(&c[0].1)).collect();
    let merges: Vec<String> = seeds.iter().map(|c| lossy(&c[1].1)).collect();
    let (json, plain) = (TextMutator::new(Syntax::Json, &vocabs), TextMutator::new(Syntax::Plain, &merges));
    fuzz(Target {
        name: "sd_tokenizer",
        fixed: vec![],
        seeds,
        mutate: Box::new(move |rng, seeds| {
            let mut case = pick(rng, seeds).clone();
            let which = rng.random_range(0..5);
            if which < 2 || which == 4 {
                case[0].1 = mutate_vocab(rng, &case[0].1, &json);
            }
            if which >= 2 {
                case[1].1 = mutate_merges(rng, &case[1].1, &plain);
            }
            if rng.random_bool(0.03) {
                case.remove(rng.random_range(0..2));
            }
            case
        }),
        exec: Box::new(|dir| {
            let tok = ClipTokenizer::load(&dir.join("tokenizer")).map_err(|e| {
                let msg = e.to_string();
                assert!(msg.contains("vocab.json") || msg.contains("merges.txt"), "the error does not name the file: {msg}");
                msg
            })?;
            for p in PROBE_PROMPTS {
                check_encoding(&tok, p);
            }
            Ok(())
        }),
    });
}

/// Characters that exercise normalisation (combining marks, case mappings that change length,
/// invisible and special characters) and CLIP's pattern (contractions, special tokens).
const ODD_CHARS: [char; 36] = [
    '\u{0301}', '\u{0308}', '\u{0327}', '\u{030c}', 'İ', 'ẞ', 'ß', 'ﬃ', 'Σ', 'ς', 'ǅ', '\u{212a}', '\u{0345}', '\u{200b}', '\u{200d}', '\u{feff}', '\u{2028}', '\u{3000}', '\u{0}', '\u{7f}', '\u{ad}', '\u{fffd}', '\u{ffff}', '\u{10ffff}', '😀', '\u{1f3fd}', '中', '한', 'ا', '\u{202e}', '\r', '\t', '\n', '\'', '<', '|',
];
const ODD_PIECES: [&str; 10] = ["<|startoftext|>", "<|endoftext|>", "<|endoftext", "'s", "'ll", "’s", " ' ", "a\u{0301}", "A\u{030a}", "1234567890"];

/// One mutation of a prompt, by characters.
fn mutate_prompt(rng: &mut StdRng, text: &str, dict: &[String]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    let n = chars.len();
    match rng.random_range(0..9) {
        0 => {
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..=chars.len());
                chars.insert(at, *pick(rng, &ODD_CHARS));
            }
        }
        1 => {
            let at = rng.random_range(0..=n);
            chars.splice(at..at, pick(rng, &ODD_PIECES).chars());
        }
        2 => {
            // Any scalar value.
            let at = rng.random_range(0..=n);
            let c = std::iter::repeat_with(|| char::from_u32(rng.random_range(0..0x11_0000))).flatten().next().unwrap();
            chars.insert(at, c);
        }
        3 if n > 0 => {
            // Long words and long texts: a chunk repeated.
            let a = rng.random_range(0..n);
            let b = (a + rng.random_range(1..=8)).min(n);
            let chunk: Vec<char> = chars[a..b].to_vec();
            let times = *pick(rng, &[2usize, 10, 100, 1000, 10_000]);
            let rep: Vec<char> = chunk.iter().copied().cycle().take(chunk.len() * times).collect();
            chars.splice(a..a, rep);
        }
        4 if n > 0 => {
            let a = rng.random_range(0..n);
            let b = (a + rng.random_range(1..=20)).min(n);
            chars.drain(a..b);
        }
        5 if !dict.is_empty() => {
            let other: Vec<char> = pick(rng, dict).chars().collect();
            let (a, b) = (rng.random_range(0..=n), rng.random_range(0..=other.len()));
            chars.truncate(a);
            chars.extend_from_slice(&other[b..]);
        }
        7 => {
            // A long word of random letters (little repetition: BPE merges of many ranks).
            let at = rng.random_range(0..=n);
            let len = *pick(rng, &[100usize, 1000, 10_000, 60_000]);
            let word: Vec<char> = (0..len).map(|_| (b'a' + rng.random_range(0..26u8)) as char).collect();
            chars.splice(at..at, word);
        }
        6 => {
            // A letter followed by a run of combining marks.
            let at = rng.random_range(0..=n);
            let marks: Vec<char> = (0..rng.random_range(1..50)).map(|_| char::from_u32(rng.random_range(0x300..0x370)).unwrap()).collect();
            chars.splice(at..at, std::iter::once('e').chain(marks));
        }
        _ => {
            let mut b = text.as_bytes().to_vec();
            mutate_bytes(rng, &mut b, &[]);
            return lossy(&b);
        }
    }
    chars.into_iter().collect()
}

#[test]
fn fuzz_sd_tokenizer_encode() {
    // The real tokenizer (all 49408 tokens) when present, the synthetic one otherwise.
    let reference = sd_reference();
    let tok = match reference.as_ref().and_then(|d| ClipTokenizer::load(&d.join("tokenizer")).ok()) {
        Some(t) => t,
        None => {
            let dir = scratch("sd_tokenizer_encode_files");
            write_case(&dir, &synthetic_tokenizer());
            ClipTokenizer::load(&dir.join("tokenizer")).unwrap()
        }
    };
    let mut texts: Vec<String> = dmd_datasets::prompts::builtin_prompts().into_iter().take(12).collect();
    texts.extend(PROBE_PROMPTS.iter().map(|s| s.to_string()));
    if let Some(list) = reference.and_then(|d| std::fs::read_to_string(d.join("tokenizer_prompts.json")).ok()).and_then(|t| serde_json::from_str::<Vec<String>>(&t).ok()) {
        texts.extend(list);
    }
    let seeds: Vec<Case> = texts.iter().map(|t| vec![("prompt.txt".to_string(), t.clone().into_bytes())]).collect();
    fuzz(Target {
        name: "sd_tokenizer_encode",
        fixed: vec![],
        seeds,
        mutate: Box::new(move |rng, seeds| {
            let mut text = lossy(&pick(rng, seeds)[0].1);
            for _ in 0..mutation_count(rng) {
                text = mutate_prompt(rng, &text, &texts);
            }
            let mut end = text.len().min(MAX_TEXT);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            vec![("prompt.txt".to_string(), text.into_bytes())]
        }),
        exec: Box::new(move |dir| {
            let text = lossy(&std::fs::read(dir.join("prompt.txt")).unwrap());
            check_encoding(&tok, &text);
            Ok(())
        }),
    });
}

/// Calls the parser(s) on a work folder.
type Exec = Box<dyn Fn(&Path) -> Result<(), String> + Send>;

/// A JSON config target: one file per input, seeded with `texts`.
fn sd_json_target(name: &'static str, file: &'static str, texts: Vec<String>, exec: Exec) {
    let seeds: Vec<Case> = texts.into_iter().map(|t| vec![(file.to_string(), t.into_bytes())]).collect();
    text_target(name, Syntax::Json, vec![], seeds, exec);
}

/// A config equal to another up to serde_json's float parsing (without its `float_roundtrip`
/// feature a float written and read back may move by one unit in the last place).
fn assert_same_json(a: &serde_json::Value, b: &serde_json::Value) {
    use serde_json::Value;
    let same = match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 1e-15 * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            x.iter().zip(y).for_each(|(x, y)| assert_same_json(x, y));
            true
        }
        (Value::Object(x), Value::Object(y)) if x.len() == y.len() => {
            for (k, v) in x {
                assert_same_json(v, y.get(k).unwrap_or_else(|| panic!("config changed in a save -> load round trip: `{k}` gone")));
            }
            true
        }
        _ => a == b,
    };
    assert!(same, "config changed in a save -> load round trip: {a} became {b}");
}

/// The reference folder's `<part>/config.json`, when present.
fn reference_config(part: &str) -> Option<String> {
    std::fs::read_to_string(sd_reference()?.join(part).join("config.json")).ok()
}

/// The message of an error from reading `path`; it must name the file.
fn names_file(path: &Path, msg: String) -> String {
    assert!(msg.contains(&path.display().to_string()), "the error does not name {}: {msg}", path.display());
    msg
}

const TINY_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "sample_size": 16, "in_channels": 4, "out_channels": 4,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "block_out_channels": [32, 64, 64], "layers_per_block": 1,
  "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 32
}"#;

const PER_BLOCK_UNET: &str = r#"{
  "sample_size": 8, "in_channels": 1, "out_channels": 2, "center_input_sample": true, "flip_sin_to_cos": false, "freq_shift": 1,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
  "block_out_channels": [8, 16], "layers_per_block": [1, 2], "norm_num_groups": 4, "norm_eps": 1e-6,
  "cross_attention_dim": [8, 12], "transformer_layers_per_block": [1, 2], "attention_head_dim": [2, 4],
  "use_linear_projection": true, "time_embedding_dim": 24, "conv_in_kernel": 1, "conv_out_kernel": 5,
  "only_cross_attention": [false, false], "dropout": 0.0, "act_fn": "silu", "num_attention_heads": null, "upcast_attention": true
}"#;

#[test]
fn fuzz_sd_unet_config() {
    use dmd_models::sd::unet::{PerBlock, UNet2DCondition, UNetConfig};
    let mut texts = vec![TINY_UNET.to_string(), PER_BLOCK_UNET.to_string(), UNetConfig::sd15().to_json()];
    texts.extend(reference_config("unet"));
    let device = cpu();
    sd_json_target(
        "sd_unet_config",
        "config.json",
        texts,
        Box::new(move |dir| {
            let p = dir.join("config.json");
            let b = UNetConfig::from_json_file(&p);
            // Text (the file when it is UTF-8) and file must agree.
            if let Ok(text) = String::from_utf8(std::fs::read(&p).unwrap()) {
                let a = UNetConfig::from_json_str(&text);
                assert_eq!(a.is_ok(), b.is_ok(), "string and file disagree: {:?} / {:?}", a.err(), b.as_ref().err());
            }
            let c = b.map_err(|e| names_file(&p, e.to_string()))?;
            // What `save` writes back loads as the same config.
            let again = UNetConfig::from_json_str(&c.to_json()).unwrap_or_else(|e| panic!("a valid config's own JSON does not load: {e}"));
            assert_same_json(&serde_json::to_value(&again).unwrap(), &serde_json::to_value(&c).unwrap());
            // Loading builds the network before it compares the weights file: with an empty
            // file that must be an error (missing tensors), for configs small enough to build.
            let max = |v: &PerBlock| match v {
                PerBlock::One(x) => *x,
                PerBlock::Each(v) => v.iter().copied().max().unwrap_or(0),
            };
            let small = c.block_out_channels.len() <= 4
                && c.block_out_channels.iter().all(|&x| x <= 32)
                && [max(&c.layers_per_block), max(&c.transformer_layers_per_block)].iter().all(|&x| x <= 2)
                && max(&c.cross_attention_dim) <= 64
                && max(&c.attention_head_dim) <= 32
                && c.time_embedding_dim.unwrap_or(0) <= 256
                && c.in_channels.max(c.out_channels) <= 16
                && c.conv_in_kernel.max(c.conv_out_kernel) <= 5;
            if small {
                let r = UNet2DCondition::from_named(&c, &NamedTensors::default(), "empty.safetensors", &device, "unet");
                assert!(r.is_err(), "an empty weights file loads");
            }
            Ok(())
        }),
    );
}

#[test]
fn fuzz_sd_vae_config() {
    use dmd_models::sd::vae::{AutoencoderKL, VaeConfig};
    let mut texts = vec![
        "{}".to_string(),
        serde_json::to_string_pretty(&VaeConfig::default()).unwrap(),
        r#"{"_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "layers_per_block": 2, "latent_channels": 2, "norm_num_groups": 4,
            "scaling_factor": 0.13025, "shift_factor": null, "latents_mean": null, "use_quant_conv": false, "use_post_quant_conv": false,
            "mid_block_add_attention": false, "sample_size": 32, "force_upcast": true}"#
            .to_string(),
    ];
    texts.extend(reference_config("vae"));
    let device = cpu();
    sd_json_target(
        "sd_vae_config",
        "config.json",
        texts,
        Box::new(move |dir| {
            let p = dir.join("config.json");
            let b = VaeConfig::from_json_file(&p);
            // Text (the file when it is UTF-8) and file must agree.
            if let Ok(text) = String::from_utf8(std::fs::read(&p).unwrap()) {
                let a = VaeConfig::from_json_str(&text);
                assert_eq!(a.is_ok(), b.is_ok(), "string and file disagree: {:?} / {:?}", a.err(), b.as_ref().err());
            }
            let c = b.map_err(|e| names_file(&p, e.to_string()))?;
            let again = VaeConfig::from_json_str(&serde_json::to_string(&c).unwrap()).unwrap_or_else(|e| panic!("a valid config's own JSON does not load: {e}"));
            assert_same_json(&serde_json::to_value(&again).unwrap(), &serde_json::to_value(&c).unwrap());
            let small = c.block_out_channels.len() <= 4
                && c.block_out_channels.iter().all(|&x| x <= 32)
                && c.layers_per_block <= 2
                && c.in_channels.max(c.out_channels).max(c.latent_channels) <= 16;
            if small {
                let r = AutoencoderKL::from_named(&c, &NamedTensors::default(), "empty.safetensors", &device, "vae");
                assert!(r.is_err(), "an empty weights file loads");
            }
            Ok(())
        }),
    );
}

#[test]
fn fuzz_sd_clip_config() {
    use dmd_models::sd::clip::{ClipTextConfig, ClipTextModel};
    let mut texts = vec![
        r#"{"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05, "model_type": "clip_text_model"}"#
            .to_string(),
        r#"{"vocab_size": 16, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "max_position_embeddings": 77, "hidden_act": "gelu"}"#
            .to_string(),
    ];
    texts.extend(reference_config("text_encoder"));
    let device = cpu();
    sd_json_target(
        "sd_clip_config",
        "config.json",
        texts,
        Box::new(move |dir| {
            let p = dir.join("config.json");
            let c = ClipTextConfig::from_json_file(&p).map_err(|e| names_file(&p, e.to_string()))?;
            let small = c.vocab_size.max(c.max_position_embeddings) <= 4096 && c.hidden_size <= 64 && c.intermediate_size <= 256 && c.num_hidden_layers <= 4;
            if small {
                let r = ClipTextModel::from_named(&c, &NamedTensors::default(), "empty.safetensors", &device);
                assert!(r.is_err(), "an empty weights file loads");
            }
            Ok(())
        }),
    );
}

#[test]
fn fuzz_sd_scheduler_config() {
    use dmd_models::sd::scheduler::{sample, Scheduler, SchedulerConfig, SchedulerKind};
    let texts = vec![
        // SD v1.5's scheduler/scheduler_config.json.
        r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#
            .to_string(),
        r#"{"_class_name": "DDIMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 50,
            "set_alpha_to_one": true, "steps_offset": 0, "clip_sample": true, "clip_sample_range": 1.5, "prediction_type": "epsilon",
            "timestep_spacing": "leading", "rescale_betas_zero_snr": false, "thresholding": false}"#
            .to_string(),
        "{}".to_string(),
    ];
    let device = cpu();
    sd_json_target(
        "sd_scheduler_config",
        "scheduler_config.json",
        texts,
        Box::new(move |dir| {
            let p = dir.join("scheduler_config.json");
            let cfg = SchedulerConfig::from_json_file(&p).map_err(|e| names_file(&p, e.to_string()))?;
            let alphas = cfg.alphas_cumprod();
            assert_eq!(alphas.len(), cfg.num_train_timesteps);
            let t = cfg.num_train_timesteps;
            for kind in [SchedulerKind::Pndm, SchedulerKind::Ddim] {
                for steps in [0, 1, 2, 3, 5, t / 3, t - 1, t, t + 1] {
                    let Ok(s) = Scheduler::new(&cfg, kind, steps) else { continue };
                    assert!(s.timesteps().iter().all(|&x| x < t), "{kind:?}, {steps} steps: timesteps {:?} outside [0, {t})", s.timesteps());
                    // A short run through every update (the epsilon: the input scaled).
                    if steps <= 5 {
                        let z: Tensor<4> = Tensor::ones([1, 1, 1, 2], &device);
                        let _ = sample(&cfg, kind, steps, z, |x, _| x.mul_scalar(0.5), |_, _| {}).map(|x| x.into_data());
                    }
                }
            }
            Ok(())
        }),
    );
}

#[test]
fn fuzz_sd_distill_config() {
    let mut seeds: Vec<Case> = Vec::new();
    for f in ["tiny_dmd2.toml", "dmd_sd15.toml", "dmd2_sd15.toml"] {
        let text = read_repo(&format!("experiments/configs/sd/{f}"));
        seeds.push(vec![("distill.toml".to_string(), text.clone().into_bytes())]);
        // Every key, as the run folder's config.toml has it.
        let cfg = TextDistillConfig::from_file(&repo(&format!("experiments/configs/sd/{f}"))).unwrap();
        seeds.push(vec![("distill.toml".to_string(), toml::to_string_pretty(&cfg).unwrap().into_bytes())]);
    }
    text_target(
        "sd_distill_config",
        Syntax::Toml,
        vec![],
        seeds,
        Box::new(|dir| {
            let p = dir.join("distill.toml");
            let _ = is_text_config(&p);
            let cfg = TextDistillConfig::from_file(&p).map_err(|e| names_file(&p, format!("{e:#}")))?;
            // The run folder keeps the config as written here, and a resume reads it back.
            let saved = dir.join("saved.toml");
            std::fs::write(&saved, toml::to_string_pretty(&cfg).unwrap_or_else(|e| panic!("a valid config does not serialise: {e}"))).unwrap();
            let again = TextDistillConfig::from_file(&saved).unwrap_or_else(|e| panic!("a valid config's saved form does not load: {e:#}"));
            assert!(again == cfg, "config changed in a save -> load round trip");
            std::fs::remove_file(&saved).unwrap();
            Ok(())
        }),
    );
}

#[test]
fn fuzz_prompt_file() {
    let builtin = dmd_datasets::prompts::BUILTIN.to_string();
    let texts = [
        builtin.lines().take(40).collect::<Vec<_>>().join("\n"),
        "\u{feff}# prompts\r\na red kite   \r\n\r\n  \n#a comment\na blue boat\t\nCafé déjà vu — naïve\n😀 中文\n".to_string(),
        "one prompt without a newline".to_string(),
    ];
    let seeds: Vec<Case> = texts.iter().map(|t| vec![("prompts.txt".to_string(), t.clone().into_bytes())]).collect();
    let plain = TextMutator::new(Syntax::Plain, &texts);
    fuzz(Target {
        name: "prompt_file",
        fixed: vec![],
        seeds,
        mutate: Box::new(move |rng, seeds| {
            let mut b = pick(rng, seeds)[0].1.clone();
            for _ in 0..mutation_count(rng) {
                match rng.random_range(0..4) {
                    0 => mutate_bytes(rng, &mut b, &[]),
                    // Latin-1, a cut UTF-8 sequence, a lone continuation byte, a UTF-16 BOM.
                    1 => {
                        let at = rng.random_range(0..=b.len());
                        b.splice(at..at, pick(rng, &[&b"\xe9"[..], b"\xc3", b"\xe2\x80", b"\x80", b"\xff\xfe", b"\xed\xa0\x80"]).iter().copied());
                    }
                    2 => b = plain.mutate(rng, &lossy(&b)).into_bytes(),
                    _ => b = mutate_prompt(rng, &lossy(&b), &plain.dict).into_bytes(),
                }
            }
            b.truncate(MAX_INPUT);
            vec![("prompts.txt".to_string(), b)]
        }),
        exec: Box::new(|dir| {
            let p = dir.join("prompts.txt");
            let prompts = read_prompts(&p).map_err(|e| names_file(&p, e.to_string()))?;
            assert!(!prompts.is_empty(), "Ok with no prompts");
            for s in &prompts {
                assert!(!s.is_empty() && !s.starts_with('#') && !s.contains('\n') && s.trim_end() == s, "prompt {s:?} kept");
            }
            let set = PromptSet::from_file(&p).map_err(|e| e.to_string())?;
            assert_eq!(set.prompts(), prompts.as_slice());
            for batch in [1, 3, set.len(), set.len() + 2] {
                assert_eq!(set.batch(7, 1, batch).len(), batch);
            }
            Ok(())
        }),
    });
}
