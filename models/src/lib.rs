//! Networks of dmd-burn: EDM's `EDMPrecond` over `DhariwalUNet` (ADM) and `SongUNet`
//! (DDPM++/NCSN++), a toy MLP for 2-D data, EDM's samplers, and named-weight import/export.
//! Every network is backend-agnostic: the backend is the `Device` its tensors live on.

pub mod config;
pub mod fused_update;
mod cpu_cat;
pub mod cpu_conv;
mod cpu_exp;
pub mod cpu_attention;
pub mod cpu_resample;
pub mod cpu_group_norm;
#[cfg(cube_kernels)]
mod cube_attention;
#[cfg(cube_kernels)]
mod cube_group_norm;
#[cfg(cube_kernels)]
mod cube_silu;
pub mod cpu_silu;
pub mod dhariwal;
pub mod gemm_conv;
pub mod gan_head;
pub mod inception;
pub mod lpips;
pub mod mlp;
pub mod nn;
pub mod precond;
pub mod sd;
pub mod sampler;
pub mod song;
pub mod weights;

pub use gan_head::GanHead;
pub use lpips::Lpips;
pub use config::{EdmConfig, ModelType};
pub use precond::{config_path_for, Backbone, EdmPrecond, ModelError};
pub use sampler::{edm_time_steps, sample, Denoiser, NetDenoiser, SamplerConfig, Solver};
pub use weights::{HostTensor, NamedTensors, WeightError};

/// CubeCL's dry run: while the guard lives, every kernel launch is compiled and dropped while
/// memory is still reserved, so a run's time is the host's and CubeCL's device thread's own
/// work (`examples/dry_run.rs`).
#[cfg(cube_kernels)]
pub use cubecl_runtime::dry_run::DryRun;
