//! Peak memory of a streaming merge: 8 MiniLM-sized random checkpoints (22.7M f32 parameters each)
//! plus a base, merged with several methods, each in a fresh child process whose peak RSS growth
//! (VmHWM after − VmHWM before the merge) is reported as a ratio to one model's weights file.
//!
//! Run: `cargo bench --bench merge_memory` (needs ~1 GB of temp disk; set TMPDIR to move it).
//! `--profile dev` skips a release build of the dependencies (they are optimised in dev too).
//! MERGE_MEMORY_DEBUG=1 also prints each child's /proc/self/status memory lines.

use recycle::merge::{merge_checkpoints, MergeRequest, MergeSpec, Method};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const MODELS: usize = 8;
const CHILD_FLAG: &str = "--merge-child";

/// all-MiniLM-L6-v2's parameter shapes (BERT, hidden 384, 6 layers, vocab 30522).
fn minilm_shapes() -> Vec<(String, Vec<usize>)> {
    let (h, ff, vocab) = (384, 1536, 30522);
    let mut shapes = vec![
        (
            "embeddings.word_embeddings.weight".to_string(),
            vec![vocab, h],
        ),
        ("embeddings.position_embeddings.weight".into(), vec![512, h]),
        ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    for l in 0..6 {
        let p = format!("encoder.layer.{l}");
        for (name, shape) in [
            ("attention.self.query.weight", vec![h, h]),
            ("attention.self.query.bias", vec![h]),
            ("attention.self.key.weight", vec![h, h]),
            ("attention.self.key.bias", vec![h]),
            ("attention.self.value.weight", vec![h, h]),
            ("attention.self.value.bias", vec![h]),
            ("attention.output.dense.weight", vec![h, h]),
            ("attention.output.dense.bias", vec![h]),
            ("attention.output.LayerNorm.weight", vec![h]),
            ("attention.output.LayerNorm.bias", vec![h]),
            ("intermediate.dense.weight", vec![ff, h]),
            ("intermediate.dense.bias", vec![ff]),
            ("output.dense.weight", vec![h, ff]),
            ("output.dense.bias", vec![h]),
            ("output.LayerNorm.weight", vec![h]),
            ("output.LayerNorm.bias", vec![h]),
        ] {
            shapes.push((format!("{p}.{name}"), shape));
        }
    }
    shapes.push(("pooler.dense.weight".into(), vec![h, h]));
    shapes.push(("pooler.dense.bias".into(), vec![h]));
    shapes
}

fn write_random_checkpoint(dir: &Path, seed: u64) -> Result<u64, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 384}"#,
    )?;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let shapes = minilm_shapes();
    let data: Vec<Vec<u8>> = shapes
        .iter()
        .map(|(_, shape)| {
            let n: usize = shape.iter().product();
            let mut bytes = Vec::with_capacity(n * 4);
            for _ in 0..n {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            bytes
        })
        .collect();
    let views = shapes
        .iter()
        .zip(&data)
        .map(|((name, shape), bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path)?;
    Ok(std::fs::metadata(&path)?.len())
}

fn vm_hwm_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The child: merge, print "<hwm growth bytes> <seconds>".
fn child(method: &str, root: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let method = match method {
        "average" => Method::Average,
        "task-arithmetic" => Method::TaskArithmetic,
        "ties" => Method::Ties,
        "dare-ties" => Method::DareTies,
        other => return Err(format!("unknown method {other}").into()),
    };
    let mut spec = MergeSpec::new(method, MODELS);
    spec.lambda = 1.0 / MODELS as f32;
    let req = MergeRequest {
        spec,
        base: Some(root.join("base")),
        models: (0..MODELS).map(|i| root.join(format!("m{i}"))).collect(),
        keep_head: false,
        out: root.join(format!("out-{}", method.as_str())),
    };
    let before = vm_hwm_bytes();
    let start = Instant::now();
    merge_checkpoints(&req)?;
    let secs = start.elapsed().as_secs_f64();
    let after = vm_hwm_bytes();
    if std::env::var_os("MERGE_MEMORY_DEBUG").is_some() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        for l in status
            .lines()
            .filter(|l| l.starts_with("Vm") || l.starts_with("Rss"))
        {
            eprintln!("{l}");
        }
    }
    println!("{} {secs}", after.saturating_sub(before));
    std::fs::remove_dir_all(&req.out)?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == CHILD_FLAG) {
        let (Some(method), Some(root)) = (args.get(i + 1), args.get(i + 2)) else {
            return Err("usage: --merge-child METHOD ROOT".into());
        };
        return child(method, &PathBuf::from(root));
    }
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let model_bytes = write_random_checkpoint(&root.join("base"), 1)?;
    for i in 0..MODELS {
        write_random_checkpoint(&root.join(format!("m{i}")), 100 + i as u64)?;
    }
    println!(
        "merge_memory: {MODELS} models + base, {:.1} MB each (MiniLM-sized, f32)",
        model_bytes as f64 / 1e6
    );
    let exe = std::env::current_exe()?;
    for method in ["average", "task-arithmetic", "ties", "dare-ties"] {
        let out = Command::new(&exe)
            .arg(CHILD_FLAG)
            .arg(method)
            .arg(root)
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "child merge ({method}) failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        if std::env::var_os("MERGE_MEMORY_DEBUG").is_some() {
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut fields = text.split_whitespace();
        let growth: f64 = fields.next().ok_or("no child output")?.parse()?;
        let secs: f64 = fields.next().ok_or("no child time")?.parse()?;
        println!(
            "{method:>16}: peak RSS growth {:7.1} MB = {:.3}x one model; {secs:.1} s",
            growth / 1e6,
            growth / model_bytes as f64
        );
    }
    Ok(())
}
