//! Training, evaluation and the `dmd` command line of dmd-burn.

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod device;
pub mod distill;
pub mod ema;
pub mod experiment;
pub mod fid;
pub mod metrics;
pub mod optim;
pub mod output;
pub mod pairs;
pub mod parallel;
pub mod sample;
pub mod sd_distill;
pub mod txt2img;
pub mod teacher;
