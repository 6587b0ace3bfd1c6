//! Data loading throughput: examples/s of reading a JSON-lines split (`read_split_file`, what
//! `Dataset::load` does per split after its checksum) against the baseline of only parsing the
//! same lines into untyped JSON values, measured in the same run. The texts are synthetic.
//!
//! `cargo bench --bench data_load`; `RECYCLE_BENCH_REPS=N` scales the example count.

mod common;

use rand::{Rng, SeedableRng};
use recycle::data::{read_split_file, ColumnMap, Task};
use std::io::Write;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    common::setup();
    let n = 20_000 * common::reps(1);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("train.jsonl");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for _ in 0..n {
            let words: Vec<String> = (0..rng.random_range(10..60))
                .map(|_| format!("w{}", rng.random_range(0..5000)))
                .collect();
            let line =
                serde_json::json!({"text": words.join(" "), "label": rng.random_range(0..3)});
            writeln!(f, "{line}")?;
        }
    }
    let task = Task::Classification {
        labels: vec!["a".into(), "b".into(), "c".into()],
    };
    let columns = ColumnMap::standard(false);
    read_split_file(&path, &columns, &task)?; // warm the page cache
    let start = Instant::now();
    let rows = read_split_file(&path, &columns, &task)?;
    let load_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let bytes = std::fs::read(&path)?;
    let mut parsed = 0usize;
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let _: serde_json::Value = serde_json::from_slice(line)?;
        parsed += 1;
    }
    let parse_s = start.elapsed().as_secs_f64();
    assert_eq!(rows.len(), n);
    assert_eq!(parsed, n);
    println!(
        "load   {n} jsonl examples: {:.0} examples/s read_split_file, {:.0} examples/s bare JSON parse (load / parse time = {:.2})",
        n as f64 / load_s,
        n as f64 / parse_s,
        load_s / parse_s
    );
    println!("RESULT load_examples_per_s {:.1}", n as f64 / load_s);
    Ok(())
}
