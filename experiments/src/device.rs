//! The backend, chosen at run time: `cpu` (Burn's pure-Rust `flex` backend, the default:
//! deterministic and much faster than ndarray for training), `ndarray`, or `cuda` (when built
//! with `--features cuda`); and, to check the CUDA build's code without a GPU, `cube-cpu`
//! (when built with `--features cube-cpu`).

use anyhow::Result;
use dmd_models::nn::ConvImpl;
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Burn's flex CPU backend.
    #[default]
    Cpu,
    /// Burn's ndarray CPU backend.
    Ndarray,
    /// NVIDIA GPU (build with `--features cuda`).
    Cuda,
    /// CubeCL's CPU runtime (build with `--features cube-cpu`): runs the code CUDA runs (Burn's
    /// CubeCL kernels and this project's, `models/src/cube_*.rs`), slowly, to check it and to
    /// count its kernel launches without a GPU. Not for training.
    #[serde(rename = "cube-cpu")]
    CubeCpu,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Ndarray => "ndarray",
            Self::Cuda => "cuda",
            Self::CubeCpu => "cube-cpu",
        })
    }
}

impl Backend {
    /// The device to compute on (no autodiff): `device_at(0)`.
    pub fn device(self) -> Result<Device> {
        self.device_at(0)
    }

    /// Device `index` of this backend: GPU `index` on CUDA; the CPU backends have one device,
    /// which every index names. Also sets how the process computes its convolutions, which
    /// depends on the backend (`conv_impl`).
    pub fn device_at(self, index: usize) -> Result<Device> {
        dmd_models::nn::set_conv_impl(self.conv_impl()?);
        dmd_models::nn::set_cube_kernels(cube_kernels()?);
        Ok(match self {
            Self::Cpu => Device::flex(),
            // Deprecated upstream in favour of flex; kept for users' deterministic tests.
            #[allow(deprecated)]
            Self::Ndarray => Device::ndarray(),
            Self::Cuda => cuda_device(index)?,
            Self::CubeCpu => cube_cpu_device()?,
        })
    }

    /// How convolutions run on this backend: `DMD_CONV=native|im2col|gemm` when set;
    /// otherwise `gemm` (`gemm_conv`) on CUDA (Burn's implicit-GEMM kernels: Burn 0.22 without
    /// its `autotune` feature runs `conv2d` as a direct kernel, many times slower;
    /// results/bench/cuda) and on flex (`cpu_conv`'s blocked im2col products, ~2x Burn's
    /// `conv2d` forward + backward; results/bench/README.md), and Burn's own `conv2d` on
    /// ndarray, the deterministic reference. `cube-cpu` is as CUDA (where the CPU runtime has
    /// no implicit-GEMM kernel, Burn's direct kernels run behind `gemm`).
    pub fn conv_impl(self) -> Result<ConvImpl> {
        let choice = std::env::var("DMD_CONV").unwrap_or_default().trim().to_ascii_lowercase();
        match choice.as_str() {
            "native" => Ok(ConvImpl::Native),
            "im2col" => Ok(ConvImpl::Im2col),
            "gemm" => Ok(ConvImpl::Gemm),
            "" if self == Self::Ndarray => Ok(ConvImpl::Native),
            "" => Ok(ConvImpl::Gemm),
            other => anyhow::bail!("DMD_CONV={other:?}: expected `native`, `im2col` or `gemm`"),
        }
    }
}

/// `DMD_CUBE_KERNELS=on|off` (default on): this project's CubeCL code on CUDA (group norm,
/// attention, SiLU, the convolutions' bias, the Adam/AdamW and EMA updates; `models/src/cube_*.rs`,
/// `gemm_conv.rs`, `fused_update.rs`); off runs Burn's ops there instead, for comparisons. The
/// CPU backends ignore it.
pub fn cube_kernels() -> Result<bool> {
    parse_cube_kernels(&std::env::var("DMD_CUBE_KERNELS").unwrap_or_default())
}

fn parse_cube_kernels(value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "on" => Ok(true),
        "off" => Ok(false),
        other => anyhow::bail!("DMD_CUBE_KERNELS={other:?}: expected `on` or `off`"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(index: usize) -> Result<Device> {
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_index: usize) -> Result<Device> {
    anyhow::bail!("this `dmd` was built without CUDA support: rebuild with `cargo build --release --features cuda` (see README, 'CUDA')")
}

#[cfg(feature = "cube-cpu")]
fn cube_cpu_device() -> Result<Device> {
    Ok(Device::cpu())
}

#[cfg(not(feature = "cube-cpu"))]
fn cube_cpu_device() -> Result<Device> {
    anyhow::bail!("this `dmd` was built without `--features cube-cpu` (CubeCL's CPU runtime; see README, 'CUDA')")
}

#[cfg(test)]
mod tests {
    use super::{parse_cube_kernels, Backend};

    #[test]
    fn cube_cpu_has_one_name_in_configs_and_on_the_command_line() {
        use clap::ValueEnum;
        #[derive(serde::Deserialize)]
        struct Config {
            device: Backend,
        }
        let from_config: Config = toml::from_str("device = \"cube-cpu\"").unwrap();
        assert_eq!(from_config.device, Backend::CubeCpu);
        assert_eq!(Backend::from_str("cube-cpu", false).unwrap(), Backend::CubeCpu);
        assert_eq!(Backend::CubeCpu.to_string(), "cube-cpu");
        if !cfg!(feature = "cube-cpu") {
            let err = Backend::CubeCpu.device().unwrap_err().to_string();
            assert!(err.contains("--features cube-cpu"), "{err}");
        }
    }

    #[test]
    fn cube_kernels_are_on_unless_turned_off() {
        assert!(parse_cube_kernels("").unwrap() && parse_cube_kernels(" On ").unwrap());
        assert!(!parse_cube_kernels("off").unwrap());
        let err = parse_cube_kernels("no").unwrap_err().to_string();
        assert!(err.contains("DMD_CUBE_KERNELS=\"no\"") && err.contains("`on` or `off`"), "{err}");
    }
}
