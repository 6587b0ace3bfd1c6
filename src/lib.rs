//! recycle: rank fine-tuned checkpoints as starting points for new text-classification tasks.
//!
//! The binary is a thin shell over this library; see `cli` for the commands and the modules below
//! for the concepts they are built from.

pub mod alloc;
pub mod assets;
pub mod atomic;
pub mod check;
pub mod cli;
pub mod data;
pub mod device;
pub mod executor;
pub mod export;
pub mod fuse;
pub mod hub;
pub mod leaderboard;
pub mod merge;
pub mod model;
pub mod plan;
pub mod progress;
pub mod results;
pub mod runner;
pub mod select;
pub mod slurm;
pub mod suite;
pub mod tokenize;
pub mod train;
