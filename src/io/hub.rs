//! Hugging Face hub names (`mlx-community/Mistral-7B-Instruct-v0.3-4bit`, `org/name@revision`)
//! where a model path is taken, resolved through the cache `huggingface_hub` writes and mlx-lm
//! and `huggingface-cli` read, so a model they downloaded is used offline:
//!
//! ```text
//! $HF_HUB_CACHE | $HF_HOME/hub | ~/.cache/huggingface/hub
//!   models--{org}--{name}/refs/{revision}     the commit the revision points at (main: latest)
//!   models--{org}--{name}/snapshots/{commit}/ the files (links into blobs/)
//! ```
//!
//! A name the cache lacks is downloaded into it (`hub_download.rs`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// A repository on the hub and the revision asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoId {
    /// The owner (`mlx-community`).
    pub org: String,
    /// The repository (`Mistral-7B-Instruct-v0.3-4bit`).
    pub name: String,
    /// A branch, tag or commit; `main` when not given.
    pub revision: String,
}

impl RepoId {
    /// `org/name` or `org/name@revision` with the hub's characters (letters, digits, `-`, `_`,
    /// `.`; no leading `.` or `-`, no `..`); `None` for anything else, such as a path.
    pub fn parse(text: &str) -> Option<Self> {
        let (repo, revision) = match text.split_once('@') {
            Some((repo, rev)) if !rev.is_empty() && !rev.contains(['/', '\\']) => (repo, rev),
            Some(_) => return None,
            None => (text, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let part = |p: &str| {
            !p.is_empty()
                && !p.starts_with(['.', '-'])
                && !p.contains("..")
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        (part(org) && part(name) && !revision.contains("..")).then(|| RepoId {
            org: org.into(),
            name: name.into(),
            revision: revision.into(),
        })
    }

    /// The repository's folder in a hub cache: `models--{org}--{name}`.
    pub fn folder(&self) -> String {
        format!("models--{}--{}", self.org, self.name)
    }
}

/// The hub cache folder as `huggingface_hub` picks it from the environment (`var` reads one
/// variable): `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir(var: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let set = |k: &str| var(k).filter(|v| !v.is_empty());
    if let Some(dir) = set("HF_HUB_CACHE") {
        return Some(dir.into());
    }
    if let Some(home) = set("HF_HOME") {
        return Some(Path::new(&home).join("hub"));
    }
    set("HOME").map(|home| Path::new(&home).join(".cache/huggingface/hub"))
}

/// `repo`'s files in the cache at `cache`: the snapshot its revision points at (a commit hash
/// names its snapshot directly). A missing repository or revision is an error naming the
/// folder searched and how to download it.
pub fn snapshot(cache: &Path, repo: &RepoId) -> Result<PathBuf> {
    let id = format!("{}/{}", repo.org, repo.name);
    let dir = cache.join(repo.folder());
    let download = format!(
        "download it with `huggingface-cli download {id}` (or let mlx-lm fetch it once), or give the model's folder"
    );
    if !dir.is_dir() {
        bail!(
            "`{id}` is not a path, and the Hugging Face cache has no copy of it: {} does not exist (the cache is HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub); {download}",
            dir.display()
        );
    }
    let is_commit =
        repo.revision.len() == 40 && repo.revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit {
        repo.revision.clone()
    } else {
        let reference = dir.join("refs").join(&repo.revision);
        match std::fs::read_to_string(&reference) {
            Ok(text) => text.trim().to_string(),
            Err(_) => bail!(
                "`{id}` is in the Hugging Face cache ({}), but not at revision `{}` ({} is missing); {download}",
                dir.display(),
                repo.revision,
                reference.display()
            ),
        }
    };
    let snapshot = dir.join("snapshots").join(&commit);
    if commit.is_empty() || commit.contains(['/', '\\', '.']) || !snapshot.is_dir() {
        bail!(
            "`{id}`@{}: the Hugging Face cache points at snapshot `{commit}`, which {} does not hold (an interrupted download?); {download}",
            repo.revision,
            dir.join("snapshots").display()
        );
    }
    Ok(snapshot)
}

/// [`resolve_model`] in the hub cache this process's environment names ([`cache_dir`]); a hub
/// name the cache lacks, or holds only part of (an interrupted download), is downloaded into
/// it (`hub_download`), unless `HF_HUB_OFFLINE` is set.
pub fn resolve_model_here(arg: &Path) -> Option<Result<PathBuf>> {
    let var = |k: &str| std::env::var(k).ok();
    let cache = cache_dir(var);
    let found = resolve_model(arg, cache.as_deref())?;
    let offline = super::hub_download::offline(var);
    let missing = match found {
        Ok(path) if arg.exists() || offline || super::hub_download::complete(&path) => {
            return Some(Ok(path));
        }
        Ok(partial) => anyhow::anyhow!("{} lacks its weights", partial.display()),
        Err(missing) => missing,
    };
    let (Some(repo), Some(cache)) = (arg.to_str().and_then(RepoId::parse), cache) else {
        return Some(Err(missing));
    };
    if offline {
        return Some(Err(
            missing.context("HF_HUB_OFFLINE is set, so it was not downloaded")
        ));
    }
    Some(
        super::hub_download::download(&repo, &cache, var)
            .and_then(|dir| only_gguf(&dir))
            .with_context(|| {
                format!(
                    "`{}` is not a path, nor whole in the Hugging Face cache at {}",
                    arg.display(),
                    cache.join(repo.folder()).display()
                )
            }),
    )
}

/// What to open for a model argument: `arg` itself when it exists, else the cached snapshot of
/// the hub name it spells; its only `.gguf` file when the snapshot is a GGUF repository (no
/// `config.json`). `None` when `arg` is neither a path nor a hub name.
pub fn resolve_model(arg: &Path, cache: Option<&Path>) -> Option<Result<PathBuf>> {
    if arg.exists() {
        return Some(Ok(arg.to_path_buf()));
    }
    let repo = RepoId::parse(arg.to_str()?)?;
    let Some(cache) = cache else {
        return Some(Err(anyhow::anyhow!(
            "`{}` is not a path, and there is no Hugging Face cache to look in (set HF_HUB_CACHE or HF_HOME)",
            arg.display()
        )));
    };
    Some(snapshot(cache, &repo).and_then(|dir| only_gguf(&dir)))
}

/// `dir`, or its only `.gguf` file when it has no `config.json`; several are an error listing
/// them.
fn only_gguf(dir: &Path) -> Result<PathBuf> {
    if dir.join("config.json").exists() {
        return Ok(dir.to_path_buf());
    }
    let mut ggufs: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    ggufs.sort();
    match ggufs.len() {
        1 => Ok(ggufs.remove(0)),
        0 => Ok(dir.to_path_buf()),
        _ => bail!(
            "{} holds several GGUF files; give one of them as the model: {}",
            dir.display(),
            ggufs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_names_parse_and_paths_do_not() {
        let id = RepoId::parse("mlx-community/Mistral-7B-Instruct-v0.3-4bit").unwrap();
        assert_eq!(
            (id.org.as_str(), id.revision.as_str()),
            ("mlx-community", "main")
        );
        assert_eq!(
            id.folder(),
            "models--mlx-community--Mistral-7B-Instruct-v0.3-4bit"
        );
        assert_eq!(RepoId::parse("a/b@v1.0").unwrap().revision, "v1.0");
        for path in [
            "runs/x/adapters/more",
            "./a/b",
            "../a",
            "a/..",
            "/abs/x",
            "a/b@",
            "a/b c",
            "model",
        ] {
            assert_eq!(RepoId::parse(path), None, "{path}");
        }
    }

    #[test]
    fn the_cache_and_offline_mode_come_from_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let all = env(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h"), ("HOME", "/u")]);
        assert_eq!(cache_dir(all), Some(PathBuf::from("/c")));
        assert_eq!(
            cache_dir(env(&[("HF_HOME", "/h"), ("HOME", "/u")])),
            Some(PathBuf::from("/h/hub"))
        );
        assert_eq!(
            cache_dir(env(&[("HOME", "/u")])),
            Some(PathBuf::from("/u/.cache/huggingface/hub"))
        );
        assert_eq!(cache_dir(env(&[])), None);
        let offline = super::super::hub_download::offline;
        assert!(offline(env(&[("HF_HUB_OFFLINE", "1")])));
        assert!(offline(env(&[("TRANSFORMERS_OFFLINE", "true")])));
        assert!(!offline(env(&[("HF_HUB_OFFLINE", "0")])));
        assert!(!offline(env(&[])));
    }
}
