//! `cfg(cube_kernels)`: this crate's CubeCL kernels (`fused_update`, `cube_group_norm`) are
//! built, for CUDA or CubeCL's CPU runtime (tests), unless Burn's fusion is on (a CubeCL device
//! then runs through `Fusion`, which fuses Burn's own ops instead).
fn main() {
    println!("cargo::rustc-check-cfg=cfg(cube_kernels)");
    let on = |feature: &str| std::env::var_os(format!("CARGO_FEATURE_{feature}")).is_some();
    if (on("CUDA") || on("CUBE_CPU")) && !on("FUSION") {
        println!("cargo::rustc-cfg=cube_kernels");
    }
}
