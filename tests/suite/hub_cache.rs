//! Hugging Face names where a model path is taken, resolved through a hub cache this test builds
//! in the layout `huggingface_hub` writes (`models--org--name/refs/main` naming a snapshot whose
//! files link into `blobs/`), as mlx-lm and `huggingface-cli` leave it; and downloaded when the
//! cache lacks them, from a stand-in for the hub's routes on 127.0.0.1 (`fake_hub`).

use crate::common;

use std::path::Path;

/// A cache at `root` holding the tiny Llama fixture as `test-org/tiny-llama`, its files linked
/// from the snapshot into `blobs/` the way the hub library stores them.
fn build_cache(root: &Path, commit: &str) {
    let repo = root.join("models--test-org--tiny-llama");
    let (blobs, snapshot) = (repo.join("blobs"), repo.join("snapshots").join(commit));
    for dir in [&blobs, &snapshot, &repo.join("refs")] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let fixture = common::fixture("models/llama-llama3rope-tied");
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let entry = entry.unwrap();
        let blob = blobs.join(entry.file_name());
        std::fs::copy(entry.path(), &blob).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&blob, snapshot.join(entry.file_name())).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&blob, snapshot.join(entry.file_name())).unwrap();
    }
}

#[test]
fn a_hub_name_opens_its_cached_snapshot_and_a_missing_one_names_the_cache() {
    let root = common::temp_dir("hub-cache");
    let _ = std::fs::remove_dir_all(&root);
    let commit = "0123456789abcdef0123456789abcdef01234567";
    build_cache(&root, commit);
    let cache = root.to_str().unwrap();
    // Online, but nothing listens at the endpoint: a cached name must need no network.
    let env = [
        ("HF_HUB_CACHE", cache),
        ("HF_ENDPOINT", "http://127.0.0.1:9"),
        ("HF_HUB_OFFLINE", ""),
    ];
    // A GGUF repository's snapshot opens its one file, also without asking the hub.
    let gguf = root.join("models--test-org--tiny-gguf");
    std::fs::create_dir_all(gguf.join("snapshots").join(commit)).unwrap();
    std::fs::create_dir_all(gguf.join("refs")).unwrap();
    std::fs::write(gguf.join("refs/main"), commit).unwrap();
    std::fs::copy(
        common::fixture("models/gemma3.gguf"),
        gguf.join("snapshots").join(commit).join("gemma3.gguf"),
    )
    .unwrap();
    let out = common::loraforge_with_env(&["inspect", "test-org/tiny-gguf"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = common::loraforge_with_env(&["inspect", "test-org/tiny-llama"], &env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("llama") && stdout.contains(commit),
        "{stdout}"
    );
    // The same through HF_HOME (its `hub` folder), and by commit.
    let home = root.join("home");
    build_cache(&home.join("hub"), commit);
    let by_commit = format!("test-org/tiny-llama@{commit}");
    let out = common::loraforge_with_env(
        &["inspect", &by_commit],
        &[("HF_HOME", home.to_str().unwrap()), ("HF_HUB_CACHE", "")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Offline, a name the cache lacks is refused naming the folder searched.
    let offline = [("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", "1")];
    let out = common::loraforge_with_env(&["inspect", "test-org/absent-model"], &offline);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("models--test-org--absent-model")
            && stderr.contains(cache)
            && stderr.contains("huggingface-cli download test-org/absent-model"),
        "{stderr}"
    );
    let out = common::loraforge_with_env(&["inspect", "test-org/tiny-llama@v2"], &offline);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("not at revision `v2`"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// A stand-in for the hub's file routes on 127.0.0.1, serving the tiny Llama fixture as
/// `test-org/tiny-llama` and `test-org/gated` (the second only with `Bearer secret`):
/// `GET /api/models/{repo}/revision/{rev}` lists the files, `GET /{repo}/resolve/{rev}/{file}`
/// serves them with the hub's headers (`x-repo-commit`, `etag`, `Content-Range` for ranges).
/// The first `cut` full downloads of `model.safetensors` stop half-way, as a dropped connection
/// does. Each request's path and `Range` are logged.
mod fake_hub {
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    pub const COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";

    /// A blob name as the hub gives one (hex, no dots): the file name's bytes in hex.
    pub fn etag(file: &str) -> String {
        file.bytes().map(|b| format!("{b:02x}")).collect()
    }

    /// Each request's path and `Range` header.
    pub type Log = Arc<Mutex<Vec<(String, Option<String>)>>>;

    pub struct Hub {
        pub url: String,
        pub log: Log,
    }

    pub fn start(cut: usize) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let files: BTreeMap<String, Vec<u8>> =
            std::fs::read_dir(crate::common::fixture("models/llama-llama3rope-tied"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| !p.ends_with("reference.json"))
                .map(|p| {
                    (
                        p.file_name().unwrap().to_string_lossy().into_owned(),
                        std::fs::read(&p).unwrap(),
                    )
                })
                .chain([("README.md".to_string(), b"# not downloaded\n".to_vec())])
                .collect();
        let files = Arc::new(files);
        let log = Arc::new(Mutex::new(vec![]));
        let cuts = Arc::new(AtomicUsize::new(cut));
        let hub = Hub {
            url,
            log: log.clone(),
        };
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (files, log, cuts) = (files.clone(), log.clone(), cuts.clone());
                std::thread::spawn(move || serve(stream, &files, &log, &cuts));
            }
        });
        hub
    }

    fn serve(
        mut stream: TcpStream,
        files: &BTreeMap<String, Vec<u8>>,
        log: &Log,
        cuts: &AtomicUsize,
    ) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request = String::new();
        reader.read_line(&mut request).unwrap();
        let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut headers = BTreeMap::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let range = headers.get("range").cloned();
        log.lock().unwrap().push((path.clone(), range.clone()));
        let repo_ok = |repo: &str| match repo {
            "test-org/tiny-llama" => Some(true),
            "test-org/gated" => {
                Some(headers.get("authorization").map(String::as_str) == Some("Bearer secret"))
            }
            _ => None,
        };
        let respond =
            |stream: &mut TcpStream, status: &str, extra: &str, body: &[u8], send: usize| {
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body[..send]);
                let _ = stream.flush();
            };
        if let Some(rest) = path.strip_prefix("/api/models/") {
            let repo = rest.split("/revision/").next().unwrap_or("");
            match repo_ok(repo) {
                None => respond(&mut stream, "404 Not Found", "", b"{}", 2),
                Some(false) => respond(&mut stream, "401 Unauthorized", "", b"{}", 2),
                Some(true) => {
                    let siblings: Vec<_> = files
                        .keys()
                        .map(|f| serde_json::json!({"rfilename": f}))
                        .collect();
                    let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
                    let b = body.as_bytes();
                    respond(
                        &mut stream,
                        "200 OK",
                        "Content-Type: application/json\r\n",
                        b,
                        b.len(),
                    );
                }
            }
            return;
        }
        let Some((repo, file)) = path[1..].split_once("/resolve/main/") else {
            return respond(&mut stream, "404 Not Found", "", b"", 0);
        };
        let (Some(true), Some(data)) = (repo_ok(repo), files.get(file)) else {
            return respond(&mut stream, "404 Not Found", "", b"", 0);
        };
        let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
            Some(r) => {
                let (a, b) = r.split_once('-').unwrap();
                let a: usize = a.parse().unwrap();
                let b = b
                    .parse::<usize>()
                    .map_or(data.len() - 1, |b| b.min(data.len() - 1));
                (a, b)
            }
            None => (0, data.len() - 1),
        };
        let body = &data[start..=end];
        let extra = format!(
            "x-repo-commit: {COMMIT}\r\netag: \"{}\"\r\nContent-Range: bytes {start}-{end}/{}\r\n",
            etag(file),
            data.len()
        );
        // A full download (not the one-byte probe) of the weights stops half-way `cut` times.
        let whole = end + 1 == data.len() && end > start;
        let send = if file == "model.safetensors"
            && whole
            && cuts
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
                .is_ok()
        {
            body.len() / 2
        } else {
            body.len()
        };
        respond(&mut stream, "206 Partial Content", &extra, body, send);
    }
}

#[test]
fn a_missing_hub_name_downloads_into_the_cache_and_resumes_where_it_stopped() {
    let root = common::temp_dir("hub-download");
    // More cuts than a run's retries: the first run stops with half the weights kept.
    let hub = fake_hub::start(5);
    let cache = root.join("cache");
    let env = [
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ("HF_ENDPOINT", hub.url.as_str()),
        ("HF_HUB_OFFLINE", ""),
    ];
    let first = common::loraforge_with_env(&["inspect", "test-org/tiny-llama"], &env);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(!first.status.success(), "the cut download passed: {stderr}");
    assert!(
        stderr.contains("model.safetensors") && stderr.contains("run the command again"),
        "{stderr}"
    );
    let repo = cache.join("models--test-org--tiny-llama");
    let part = repo
        .join("blobs")
        .join(format!("{}.part", fake_hub::etag("model.safetensors")));
    let kept = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    assert!(kept > 0, "nothing of the weights was kept");

    let second = common::loraforge_with_env(&["inspect", "test-org/tiny-llama"], &env);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(String::from_utf8_lossy(&second.stdout).contains(fake_hub::COMMIT));
    let log = hub.log.lock().unwrap().clone();
    let resumed_at = format!("bytes={kept}-");
    assert!(
        log.iter()
            .any(|(p, r)| p.ends_with("/model.safetensors") && r.as_deref() == Some(&resumed_at)),
        "no request resumed at byte {kept}: {log:?}"
    );
    // The cache is laid out as huggingface_hub lays it, the files whole, README.md not fetched.
    let snapshot = repo.join("snapshots").join(fake_hub::COMMIT);
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        fake_hub::COMMIT
    );
    let fixture = common::fixture("models/llama-llama3rope-tied");
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert_eq!(
            std::fs::read(snapshot.join(file)).unwrap(),
            std::fs::read(fixture.join(file)).unwrap(),
            "{file}"
        );
    }
    assert!(!snapshot.join("README.md").exists());
    assert!(!part.exists());
    // Now cached: a third run asks the hub nothing.
    let before = hub.log.lock().unwrap().len();
    let third = common::loraforge_with_env(&["inspect", "test-org/tiny-llama"], &env);
    assert!(third.status.success());
    assert_eq!(hub.log.lock().unwrap().len(), before);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn hub_downloads_name_the_token_an_unknown_repository_and_offline() {
    let root = common::temp_dir("hub-download-refused");
    let hub = fake_hub::start(0);
    let cache = root.join("cache");
    let cache = cache.to_str().unwrap();
    let run = |name: &str, extra: &[(&str, &str)]| {
        let env = [
            &[
                ("HF_HUB_CACHE", cache),
                ("HF_ENDPOINT", hub.url.as_str()),
                ("HF_TOKEN", ""),
                ("HF_HUB_OFFLINE", ""),
            ][..],
            extra,
        ]
        .concat();
        let out = common::loraforge_with_env(&["inspect", name], &env);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run("test-org/gated", &[]);
    assert!(
        !ok && err.contains("HF_TOKEN") && err.contains("HTTP 401"),
        "{err}"
    );
    let (ok, err) = run("test-org/gated", &[("HF_TOKEN", "secret")]);
    assert!(ok, "{err}");
    let (ok, err) = run("test-org/no-such-model", &[]);
    assert!(
        !ok && err.contains("no repository `test-org/no-such-model`"),
        "{err}"
    );
    let (ok, err) = run("test-org/no-such-model", &[("HF_HUB_OFFLINE", "1")]);
    assert!(
        !ok && err.contains("HF_HUB_OFFLINE") && err.contains("models--test-org--no-such-model"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&root);
}
