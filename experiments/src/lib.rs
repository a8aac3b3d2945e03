//! Training, evaluation and the `dmd` command line of dmd-burn.

pub mod bench;
pub mod cli;
pub mod data;
pub mod device;
pub mod ema;
pub mod metrics;
pub mod output;
pub mod sample;
pub mod teacher;
