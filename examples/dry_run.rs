//! `dmd` with CubeCL's dry run on: every kernel launch is compiled and then dropped, while
//! memory is still reserved and freed as in a real run. On CubeCL's CPU runtime this times,
//! without a GPU, the work a CUDA run does besides its kernels: our thread's (Burn's autodiff
//! and dispatch, CubeCL's launch preparation) and CubeCL's device thread's (memory
//! reservations in its pools). Values read back are meaningless (unwritten memory).
//!
//! ```sh
//! CARGO_TARGET_DIR=target/cubecpu cargo run --release --features cube-cpu --example dry_run -- \
//!     bench --device cube-cpu --config experiments/configs/networks/adm_imagenet64.json --batch 8
//! ```
//!
//! The first repetition of each part compiles its kernels (slow on the CPU runtime): keep
//! `--warmup` at 1 or more.

#[path = "../experiments/src/bin/dmd.rs"]
mod dmd;

fn main() {
    let _dry_run = dmd_models::DryRun::new();
    dmd::main()
}
