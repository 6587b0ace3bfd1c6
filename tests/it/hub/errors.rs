//! The hub's failures against the stand-in, each named by repo, revision and file: a hub that
//! goes silent (HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT), gated and private repos, revisions
//! and files that do not exist, and a download that never enters the cache unchecked.

use super::fake_hub::{FakeFile, FakeHub, SilentServer, Stall};
use super::{err_text, online, repos, tiny_bert_files, MODEL_SHA};
use recycle::hub::{self, DatasetRef, HubOptions, ModelRef, Timeouts, Token};
use std::path::Path;
use std::time::Duration;

fn short_timeouts(mut o: HubOptions) -> HubOptions {
    o.timeouts = Timeouts {
        etag: Duration::from_secs(1),
        download: Duration::from_secs(1),
    };
    o
}

/// Files under `dir` (recursively) whose names contain `part`.
fn files_named(dir: &Path, part: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.file_name().to_string_lossy().contains(part) {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[test]
fn a_silent_hub_times_out_naming_the_repo_revision_and_variable() {
    let cache = tempfile::tempdir().unwrap();
    let silent = SilentServer::start();
    let mut o = short_timeouts(HubOptions::new(cache.path()));
    o.endpoint = silent.endpoint.clone();
    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/tiny-bert@v1").unwrap(),
        &o,
    ));
    assert!(
        err.contains("org/tiny-bert@v1")
            && err.contains("HF_HUB_ETAG_TIMEOUT")
            && err.contains("sent nothing for 1s")
            && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    let err = err_text(hub::resolve_dataset(
        &DatasetRef::parse("org/tiny-sentiment", None).unwrap(),
        &o,
    ));
    assert!(
        err.contains("dataset org/tiny-sentiment@main") && err.contains("HF_HUB_ETAG_TIMEOUT"),
        "{err}"
    );
}

#[test]
fn a_file_whose_probe_or_body_stalls_times_out_and_leaves_nothing() {
    let cache = tempfile::tempdir().unwrap();
    let mut r = repos();
    let mut probe = tiny_bert_files();
    probe[0].1.stall = Some(Stall::Answer);
    r.add("models", "org/silent-config", "main", MODEL_SHA, probe);
    let mut body = tiny_bert_files();
    body[1].1.stall = Some(Stall::Body);
    r.add("models", "org/stalled-weights", "main", MODEL_SHA, body);
    let hub = FakeHub::start(r);
    let o = short_timeouts(online(cache.path(), &hub));

    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/silent-config").unwrap(),
        &o,
    ));
    assert!(
        err.contains("file config.json of model org/silent-config@main")
            && err.contains("HF_HUB_ETAG_TIMEOUT"),
        "{err}"
    );

    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/stalled-weights").unwrap(),
        &o,
    ));
    assert!(
        err.contains("file model.safetensors of model org/stalled-weights@main")
            && err.contains("HF_HUB_DOWNLOAD_TIMEOUT")
            && !err.contains("HF_HUB_ETAG_TIMEOUT"),
        "{err}"
    );
    let folder = cache.path().join("models--org--stalled-weights");
    assert!(
        !folder
            .join("snapshots")
            .join(MODEL_SHA)
            .join("model.safetensors")
            .exists(),
        "a half download was linked into the snapshot"
    );
    assert_eq!(
        files_named(&folder.join("blobs"), "incomplete"),
        Vec::<String>::new(),
        "a partial download was left behind"
    );
    // The files fetched before the stalled one are in place; only the stalled one is missing.
    assert!(folder
        .join("snapshots")
        .join(MODEL_SHA)
        .join("config.json")
        .is_file());
}

#[test]
fn gated_and_private_repos_say_which_and_ask_for_a_token() {
    let cache = tempfile::tempdir().unwrap();
    let mut r = repos();
    r.add("models", "org/gated", "main", MODEL_SHA, tiny_bert_files());
    r.gated.insert("org/gated".into(), "hf_OPENSESAME".into());
    r.add(
        "models",
        "org/private",
        "main",
        MODEL_SHA,
        tiny_bert_files(),
    );
    r.private
        .insert("org/private".into(), "hf_OPENSESAME".into());
    let hub = FakeHub::start(r);
    let o = online(cache.path(), &hub);

    // Gated: the listing is public, the first file says the repo is gated.
    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/gated").unwrap(),
        &o,
    ));
    assert!(
        err.contains("file config.json of model org/gated@main")
            && err.contains("401")
            && err.contains("gated")
            && err.contains("HF_TOKEN"),
        "{err}"
    );
    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/private@main").unwrap(),
        &o,
    ));
    assert!(
        err.contains("model org/private@main")
            && err.contains("401")
            && err.contains("private or does not exist")
            && err.contains("HF_TOKEN"),
        "{err}"
    );
    let mut wrong = o.clone();
    wrong.token = Token::new("hf_WRONGTOKEN");
    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/private").unwrap(),
        &wrong,
    ));
    assert!(
        err.contains("no access") && !err.contains("WRONGTOKEN"),
        "{err}"
    );
    let mut right = o.clone();
    right.token = Token::new("hf_OPENSESAME");
    for repo in ["org/gated", "org/private"] {
        let m = hub::resolve_model(&ModelRef::parse(repo).unwrap(), &right).unwrap();
        assert_eq!(m.commit, MODEL_SHA, "{repo}");
    }
}

#[test]
fn missing_revisions_and_files_are_named() {
    let cache = tempfile::tempdir().unwrap();
    let mut r = repos();
    let mut files = tiny_bert_files();
    files[2].1.listed_only = true; // vocab.txt: listed, but 404 when fetched
    r.add("models", "org/half-pushed", "main", MODEL_SHA, files);
    let hub = FakeHub::start(r);
    let o = online(cache.path(), &hub);

    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/tiny-bert@nobranch").unwrap(),
        &o,
    ));
    assert!(
        err.contains("org/tiny-bert@nobranch") && err.contains("has no revision nobranch"),
        "{err}"
    );
    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/nothing-here").unwrap(),
        &o,
    ));
    assert!(
        err.contains("org/nothing-here@main") && err.contains("no repo org/nothing-here"),
        "{err}"
    );
    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/half-pushed").unwrap(),
        &o,
    ));
    assert!(
        err.contains("file vocab.txt of model org/half-pushed@main")
            && err.contains("404")
            && err.contains("no file vocab.txt"),
        "{err}"
    );
    let err = err_text(hub::resolve_dataset(
        &DatasetRef::parse("org/tiny-sentiment@v9", None).unwrap(),
        &o,
    ));
    assert!(
        err.contains("dataset org/tiny-sentiment@v9") && err.contains("no revision v9"),
        "{err}"
    );
}

#[test]
fn a_file_is_fetched_once_and_the_snapshot_links_to_its_blob() {
    let cache = tempfile::tempdir().unwrap();
    let hub = FakeHub::start(repos());
    let o = online(cache.path(), &hub);
    let m = hub::resolve_model(&ModelRef::parse("org/tiny-bert").unwrap(), &o).unwrap();
    let weights = m.dir.join("model.safetensors");
    let link = std::fs::read_link(&weights).unwrap();
    let expected_blob = tiny_bert_files()[1].1.sha256();
    assert_eq!(
        link,
        Path::new("../../blobs").join(&expected_blob),
        "not huggingface_hub's relative link"
    );
    let downloads = |hub: &FakeHub| {
        hub.paths()
            .iter()
            .filter(|p| p.ends_with("/model.safetensors"))
            .count()
    };
    let before = downloads(&hub);
    hub::resolve_model(&ModelRef::parse("org/tiny-bert").unwrap(), &o).unwrap();
    assert_eq!(downloads(&hub), before, "a cached file was fetched again");
}

#[test]
fn cli_reads_the_timeout_from_hf_hub_etag_timeout() {
    let cache = tempfile::tempdir().unwrap();
    let silent = SilentServer::start();
    let out = assert_cmd::Command::cargo_bin("recycle")
        .unwrap()
        .args(["hub", "download", "org/tiny-bert@v2"])
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_ENDPOINT", &silent.endpoint)
        .env("HF_HUB_ETAG_TIMEOUT", "1")
        .env("HF_TOKEN", "hf_NEVERSHOWN")
        .env_remove("HF_HUB_OFFLINE")
        // If the variable were ignored the default 10 s would apply; the error says which.
        .timeout(Duration::from_secs(60))
        .assert()
        .failure()
        .get_output()
        .clone();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("org/tiny-bert@v2")
            && stderr.contains("sent nothing for 1s")
            && stderr.contains("HF_HUB_ETAG_TIMEOUT"),
        "{stderr}"
    );
    assert!(!stderr.contains("NEVERSHOWN"), "{stderr}");
}

#[test]
fn lfs_files_behind_a_cdn_redirect_and_renamed_repos_resolve() {
    let cache = tempfile::tempdir().unwrap();
    let mut r = repos();
    r.cdn = true;
    r.renamed
        .insert("org/old-name".into(), "org/tiny-bert".into());
    let mut broken = tiny_bert_files();
    // Its own content: the fake's CDN finds bodies by sha256.
    broken[1].1 = FakeFile::lfs(vec![7; 64]);
    broken[1].1.truncate_to = Some(3);
    r.add("models", "org/cdn-truncated", "main", MODEL_SHA, broken);
    let hub = FakeHub::start(r);
    let mut o = online(cache.path(), &hub);
    o.token = Token::new("hf_STAYSHOME");

    let m = hub::resolve_model(&ModelRef::parse("org/old-name").unwrap(), &o).unwrap();
    assert_eq!(m.commit, MODEL_SHA);
    let weights = std::fs::read(m.dir.join("model.safetensors")).unwrap();
    assert_eq!(
        weights,
        tiny_bert_files()[1].1.body,
        "the CDN's body, whole"
    );
    let log = hub.log.lock().unwrap().clone();
    let cdn: Vec<_> = log.iter().filter(|(p, _)| p.starts_with("/cdn/")).collect();
    assert!(!cdn.is_empty(), "the download did not follow the redirect");
    assert!(
        cdn.iter().all(|(_, auth)| auth.is_none()),
        "the token went to the CDN: {cdn:?}"
    );
    assert!(
        log.iter()
            .any(|(p, auth)| p.starts_with("/org/tiny-bert/resolve/")
                && auth.as_deref() == Some("Bearer hf_STAYSHOME")),
        "the token did not reach the hub after the rename"
    );

    // Sizes come from X-Linked-Size, so a short body from the CDN is caught.
    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/cdn-truncated").unwrap(),
        &o,
    ));
    assert!(
        err.contains("corrupt") && err.contains("model.safetensors") && err.contains("bytes"),
        "{err}"
    );
}
