//! Downloading a hub repository that the cache lacks, with the `hf-hub` crate, into the same
//! cache layout `huggingface_hub` writes (so mlx-lm and `huggingface-cli` see it too):
//!
//! - the files mlx-lm downloads (`*.json`, `model*.safetensors`, `tokenizer.model`, `*.jinja`,
//!   ...), or a GGUF repository's one `.gguf` file;
//! - progress bars on a terminal's stderr, one line per file elsewhere;
//! - a download that stops (a dropped connection, Ctrl-C, kill -9) leaves its `.part` file in
//!   `blobs/`, and the next run asks only for the bytes after it (HTTP `Range`);
//! - `HF_TOKEN` (else the token file `huggingface-cli login` wrote) for gated and private
//!   repositories, `HF_ENDPOINT` for a mirror; `HF_HUB_OFFLINE=1` downloads nothing.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use super::hub::RepoId;

/// The files mlx-lm's `_download` asks for (`allow_patterns`), one `*` at most each.
const WANTED: [&str; 9] = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
];

/// Tries per file after the first, each resuming where the last stopped.
const RETRIES: usize = 3;

/// Whether the environment forbids downloads (`HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` set
/// to 1, as `huggingface_hub` reads them).
pub fn offline(var: impl Fn(&str) -> Option<String>) -> bool {
    ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"].iter().any(|k| {
        var(k).is_some_and(|v| {
            matches!(
                v.trim().to_ascii_uppercase().as_str(),
                "1" | "ON" | "YES" | "TRUE"
            )
        })
    })
}

/// Downloads `repo` into the hub cache `cache` and returns its snapshot folder. `var` reads
/// the environment (`HF_ENDPOINT`, `HF_TOKEN`).
pub fn download(
    repo: &RepoId,
    cache: &Path,
    var: impl Fn(&str) -> Option<String>,
) -> Result<PathBuf> {
    let id = format!("{}/{}", repo.org, repo.name);
    let endpoint = var("HF_ENDPOINT")
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "https://huggingface.co".into());
    let endpoint = endpoint.trim_end_matches('/').to_string();
    let mut builder = ApiBuilder::from_cache(Cache::new(cache.to_path_buf()))
        .with_endpoint(endpoint.clone())
        .with_retries(RETRIES)
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if let Some(token) = var("HF_TOKEN").filter(|t| !t.trim().is_empty()) {
        builder = builder.with_token(Some(token.trim().to_string()));
    }
    let api = builder.build().map_err(|e| explain(e, &id, &endpoint))?;
    let hub = api.repo(Repo::with_revision(
        id.clone(),
        RepoType::Model,
        repo.revision.clone(),
    ));
    let info = hub
        .info()
        .map_err(|e| explain(e, &id, &endpoint))
        .with_context(|| format!("listing the files of `{id}`@{}", repo.revision))?;
    let files = chosen(&id, info.siblings.iter().map(|s| s.rfilename.as_str()))?;
    eprintln!(
        "downloading {id}@{} from {endpoint} into {} ({} files)",
        repo.revision,
        cache.display(),
        files.len()
    );
    let mut snapshot = None;
    for file in &files {
        let path = fetch(&hub, file, &id, &endpoint)?;
        // `snapshots/<commit>/<file>`: the folder is the file's, up as many levels as it is deep.
        let depth = Path::new(file).components().count();
        snapshot = path.ancestors().nth(depth).map(Path::to_path_buf);
    }
    snapshot.ok_or_else(|| anyhow!("`{id}` has no files to download"))
}

/// Whether a snapshot holds its weights: its `.gguf` file, `model.safetensors`, or the index
/// (downloaded last, after every shard). A GGUF file resolved from a snapshot is whole.
pub fn complete(snapshot: &Path) -> bool {
    let has = |name: &str| snapshot.join(name).exists();
    snapshot.is_file()
        || has("model.safetensors.index.json")
        || has("model.safetensors")
        || std::fs::read_dir(snapshot)
            .into_iter()
            .flatten()
            .any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "gguf")))
}

/// The repository's files to download: mlx-lm's patterns, or its only `.gguf` file; the
/// weights last and the index after them, so that [`complete`] can tell a finished download.
fn chosen<'a>(id: &str, names: impl Iterator<Item = &'a str>) -> Result<Vec<String>> {
    let names: Vec<&str> = names.collect();
    // The listing comes from the endpoint (HF_ENDPOINT may name any server): a name that is
    // not a plain relative path would be written outside the snapshot.
    if let Some(bad) = names.iter().find(|n| {
        n.is_empty()
            || n.contains('\\')
            || !Path::new(n)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
    }) {
        bail!(
            "`{id}`'s file list names `{bad}`, which is not a path inside the repository; refusing to download from this endpoint"
        );
    }
    let mut wanted: Vec<String> = names
        .iter()
        .filter(|n| WANTED.iter().any(|p| glob(p, n)))
        .map(|n| n.to_string())
        .collect();
    wanted.sort_by_key(|n| {
        let rank = match n.as_str() {
            "model.safetensors.index.json" => 2,
            n if n.ends_with(".safetensors") => 1,
            _ => 0,
        };
        (rank, n.clone())
    });
    if wanted.iter().any(|n| n.ends_with(".safetensors")) {
        return Ok(wanted);
    }
    let ggufs: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.ends_with(".gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => Ok([wanted, vec![one.to_string()]].concat()),
        [] => bail!(
            "`{id}` has no safetensors or GGUF weights to download (it holds: {})",
            names.join(", ")
        ),
        many => bail!(
            "`{id}` holds several GGUF files ({}); download the one you want with `huggingface-cli download {id} FILE` and give that file as the model",
            many.join(", ")
        ),
    }
}

/// `name` matches `pattern`, whose one `*` stands for any run of characters (`/` included, as
/// `fnmatch` has it).
fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            name.len() >= head.len() + tail.len() && name.starts_with(head) && name.ends_with(tail)
        }
    }
}

/// One file, from the cache if it is there, else downloaded (resuming its `.part` file).
fn fetch(hub: &ApiRepo, file: &str, id: &str, endpoint: &str) -> Result<PathBuf> {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!("  {file}");
    }
    hub.get(file)
        .map_err(|e| explain(e, id, endpoint))
        .with_context(|| {
            format!(
                "downloading {file} of `{id}` (what arrived is kept: run the command again to continue where it stopped)"
            )
        })
}

/// An `hf-hub` error as what to do about it.
fn explain(error: ApiError, id: &str, endpoint: &str) -> anyhow::Error {
    let status = match &error {
        ApiError::RequestError(e) => match e.as_ref() {
            ureq::Error::StatusCode(code) => Some(*code),
            _ => None,
        },
        ApiError::TooManyRetries(inner) => match inner.as_ref() {
            ApiError::RequestError(e) => match e.as_ref() {
                ureq::Error::StatusCode(code) => Some(*code),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    };
    match status {
        Some(401 | 403) => anyhow!(
            "{endpoint} refused access to `{id}` (HTTP {}): a gated or private repository needs a token; set HF_TOKEN (or run `huggingface-cli login`), and accept the model's license on its page",
            status.unwrap_or_default()
        ),
        Some(404) => anyhow!(
            "{endpoint} has no repository `{id}` (HTTP 404): check the name and the revision"
        ),
        Some(code) => anyhow!("{endpoint} answered HTTP {code} for `{id}`: {error}"),
        None => anyhow!(
            "could not download `{id}` from {endpoint}: {error} (offline? set HF_HUB_OFFLINE=1 to use only the local cache)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlx_lm_patterns_choose_the_files() {
        let names = [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.model",
            "chat_template.jinja",
            "README.md",
            "original/consolidated.00.pth",
            ".gitattributes",
        ];
        let files = chosen("a/b", names.into_iter()).unwrap();
        assert_eq!(
            files,
            [
                "chat_template.jinja",
                "config.json",
                "tokenizer.model",
                "model-00001-of-00002.safetensors",
                "model.safetensors.index.json",
            ]
        );
        let gguf = chosen("a/b", ["README.md", "m-Q4_K_M.gguf"].into_iter()).unwrap();
        assert_eq!(gguf, ["m-Q4_K_M.gguf"]);
        let err = chosen("a/b", ["x.Q4.gguf", "x.Q8.gguf"].into_iter()).unwrap_err();
        assert!(err.to_string().contains("several GGUF files"), "{err}");
        assert!(chosen("a/b", ["README.md"].into_iter()).is_err());
        for hostile in [
            "../../escape.json",
            "/etc/model.safetensors",
            "a\\..\\b.json",
        ] {
            let err = chosen("a/b", ["config.json", hostile].into_iter()).unwrap_err();
            assert!(
                err.to_string().contains("not a path inside the repository"),
                "{err}"
            );
        }
    }
}
