//! One run per folder: `<run>/.lock` is held (an OS file lock) for the whole `train`, with the
//! holder's pid and host written in it, so a second run into the same folder is refused with
//! who holds it. The OS drops the lock when its holder dies, `kill -9` included, so a lock file
//! left behind never blocks a later run.
//!
//! A folder that already holds a checkpoint is refused too, unless the run resumes it
//! (`--resume`) or starts over (`--force`, which removes the earlier run's checkpoint,
//! adapters and logs first): re-running a recipe must not silently overwrite finished work.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::run_state;

/// What a new run does with an earlier run's checkpoint in its folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse to start (the default).
    Refuse,
    /// Continue from it (`--resume`).
    Resume,
    /// Remove the earlier run's files and start over (`--force`).
    Replace,
}

/// The claim on a run folder; the lock is released when this is dropped (or the process dies).
#[derive(Debug)]
pub struct RunFolder {
    _lock: File,
    /// The folder.
    pub dir: PathBuf,
}

/// What an earlier run leaves in its folder, removed by [`Existing::Replace`].
const EARLIER_RUN: [&str; 8] = [
    "checkpoint",
    ".checkpoint-new",
    ".checkpoint-old",
    "adapters",
    "peft",
    "metrics.jsonl",
    "tensorboard",
    "recipe.toml",
];

/// Takes `dir` for one run: creates it, locks `dir/.lock` (refusing when another process holds
/// it) and applies `existing` to an earlier run's checkpoint. Returns the claim and the names of
/// what `Replace` removed.
pub fn claim(dir: &Path, existing: Existing) -> Result<(RunFolder, Vec<String>)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(".lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            bail!(
                "{} is in use by another run ({}); wait for it to finish, stop it, or give this run another name or [output] dir",
                dir.display(),
                holder.trim().trim_end_matches('.')
            );
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "this host".into());
    let holder = format!("loraforge pid {} on {host}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(holder.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))?;

    let earlier = [
        run_state::checkpoint_dir(dir),
        dir.join(".checkpoint-new"),
        dir.join(".checkpoint-old"),
    ]
    .into_iter()
    // A copy without its state.json is an unfinished save: no finished work to protect.
    .find(|p| p.join("state.json").exists());
    let mut removed = Vec::new();
    match (earlier, existing) {
        (Some(found), Existing::Refuse) => bail!(
            "{} already holds a run (its checkpoint {}); continue it with --resume, start over with --force (which deletes it), or give this run another name or [output] dir",
            dir.display(),
            found.display()
        ),
        (Some(_), Existing::Replace) => {
            for name in EARLIER_RUN {
                let path = dir.join(name);
                let gone = match std::fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
                    Ok(_) => std::fs::remove_file(&path),
                    Err(_) => continue,
                };
                gone.with_context(|| format!("removing {} (--force)", path.display()))?;
                removed.push(name.to_string());
            }
        }
        _ => {}
    }
    Ok((
        RunFolder {
            _lock: file,
            dir: dir.to_path_buf(),
        },
        removed,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lf-run-folder-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_second_claim_is_refused_while_the_first_is_held_and_allowed_after() {
        let dir = folder("lock");
        let (first, _) = claim(&dir, Existing::Refuse).unwrap();
        let err = format!("{:#}", claim(&dir, Existing::Refuse).unwrap_err());
        assert!(
            err.contains("in use by another run (loraforge pid")
                && err.contains(&std::process::id().to_string()),
            "{err}"
        );
        drop(first);
        claim(&dir, Existing::Refuse).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_earlier_checkpoint_is_refused_kept_on_resume_and_removed_on_force() {
        let dir = folder("existing");
        std::fs::create_dir_all(dir.join("checkpoint")).unwrap();
        std::fs::write(dir.join("checkpoint/state.json"), "{}").unwrap();
        std::fs::write(dir.join("metrics.jsonl"), "{}\n").unwrap();
        let err = format!("{:#}", claim(&dir, Existing::Refuse).unwrap_err());
        assert!(
            err.contains("already holds a run") && err.contains("--force"),
            "{err}"
        );
        claim(&dir, Existing::Resume).unwrap();
        assert!(dir.join("checkpoint").exists());
        let (_, removed) = claim(&dir, Existing::Replace).unwrap();
        assert_eq!(removed, ["checkpoint", "metrics.jsonl"]);
        assert!(!dir.join("checkpoint").exists() && !dir.join("metrics.jsonl").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
