//! Integration tests, compiled into one test binary.

mod data;
mod fuse;
mod hub;
mod merge;
mod models;
mod report;
mod runner;
mod select;
mod slurm;
