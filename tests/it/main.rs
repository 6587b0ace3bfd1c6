//! Integration tests, compiled into one test binary.

mod cuda_emu;
mod data;
mod e2e;
mod fuse;
mod gpu_check;
mod hub;
mod merge;
mod models;
mod precision;
mod report;
mod runner;
mod select;
mod slurm;
