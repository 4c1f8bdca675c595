//! Atomic file writes: write a sibling temporary file, flush it to disk, then rename over the
//! target, so a crash or a full disk never leaves a half-written file where a good one was.
//!
//! Every rename the program makes to publish finished work goes through [`rename`], which is
//! also the crash point of the fault tests: with `LORAFORGE_CRASH_AT_RENAME=N` in the
//! environment the process kills itself (SIGKILL, as `kill -9` would) just before its N-th such
//! rename, so a test can stop a save at every step of it instead of relying on timing luck.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically. Errors name `path`.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_with(path, |file| file.write_all(bytes))
}

/// Calls `fill` with a temporary file next to `path` and renames it into place once `fill`
/// succeeds and the data is synced. On any error the temporary file is removed; errors name
/// `path`.
pub fn write_with(path: &Path, fill: impl FnOnce(&mut File) -> io::Result<()>) -> io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut file = File::create(&tmp)?;
        fill(&mut file)?;
        file.sync_all()
    })()
    .map_err(|e| naming(e, &format!("writing {}", path.display())))
    .and_then(|()| rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Renames `from` to `to` and syncs the folder that holds `to`, so the rename survives a power
/// cut; errors name both paths. The crash point of the fault tests (see the module docs).
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    crash_point(from, to);
    fs::rename(from, to).map_err(|e| {
        naming(
            e,
            &format!("renaming {} to {}", from.display(), to.display()),
        )
    })?;
    let parent = folder_of(to);
    sync_dir(parent).map_err(|e| naming(e, &format!("syncing {}", parent.display())))
}

/// The folder that holds `path` (`.` for a bare name, where `Path::parent` gives "").
pub fn folder_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The error with what was being done (and to which path) in front of its message.
fn naming(e: io::Error, doing: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{doing}: {e}"))
}

/// Kills the process before the N-th publishing rename when `LORAFORGE_CRASH_AT_RENAME=N`.
fn crash_point(from: &Path, to: &Path) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static RENAMES: AtomicUsize = AtomicUsize::new(0);
    let n = RENAMES.fetch_add(1, Ordering::SeqCst) + 1;
    let at = std::env::var("LORAFORGE_CRASH_AT_RENAME").ok();
    if at.and_then(|v| v.parse::<usize>().ok()) == Some(n) {
        eprintln!(
            "LORAFORGE_CRASH_AT_RENAME={n}: killing the process before renaming {} to {}",
            from.display(),
            to.display()
        );
        #[cfg(unix)]
        // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught, exactly as `kill -9`.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort();
    }
}

/// Flushes a folder's entries (renames, new files) to disk. A no-op where folders cannot be
/// opened as files (not on Unix).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_fill_leaves_old_file_untouched_and_no_temp() {
        let dir = std::env::temp_dir().join(format!("lf-atomic-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let target = dir.join("a.txt");
        write(&target, b"good").unwrap();
        let err = write_with(&target, |f| {
            f.write_all(b"partial")?;
            Err(io::Error::other("disk full"))
        });
        assert!(err.is_err());
        assert_eq!(fs::read(&target).unwrap(), b"good");
        let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary file was not cleaned up");
        fs::remove_dir_all(&dir).unwrap();
    }
}
