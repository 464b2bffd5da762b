//! Files only their owner can read. Everything slimchat writes where it keeps conversations (and
//! the KV spill file) goes through here: directories are created 0700 and files 0600 *at
//! creation* (no window in which another user could open them), an existing tree that is open to
//! the group or others is tightened, and whole-file writes are atomic and durable (temp file in
//! the same directory, write, fsync, rename, fsync of the directory).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Mode of every directory slimchat creates for its data.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file slimchat creates for its data.
pub const FILE_MODE: u32 = 0o600;
/// Suffix of the temp files of [`write_atomic`]; a name with it is never a finished file.
pub const TEMP_SUFFIX: &str = ".tmp";

/// Creates `dir` and any missing parents, each 0700; one that exists is left as it is (see
/// [`tighten`]).
pub fn create_dir_private(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Opens `path` for appending, creating it 0600 if it is missing.
pub fn open_append_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Creates a new file (0600) that must not exist yet, for reading and writing.
pub fn create_new_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
}

/// The temp name [`write_atomic`] uses for `path`: hidden, in the same directory, with this
/// process's id, so that [`stale_temp`] can tell a dead writer's leftover.
pub fn temp_path(path: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy());
    path.with_file_name(format!(
        ".{name}.{}.{}{TEMP_SUFFIX}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Writes `bytes` as the whole of `path` (0600): a kill or a power cut at any moment leaves the
/// old file or the new one, never a mix. On an error the temp file is removed and the old file
/// is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = create_new_private(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // the rename itself is only durable once the directory is
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A temp file of [`write_atomic`] whose writer is no longer running (a leftover of a kill).
pub fn stale_temp(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(TEMP_SUFFIX) else {
        return false;
    };
    if !name.starts_with('.') {
        return false;
    }
    let mut parts = stem.rsplit('.');
    let _counter = parts.next();
    match parts.next().and_then(|p| p.parse::<u32>().ok()) {
        Some(pid) => {
            // only where /proc tells which processes run
            pid != std::process::id()
                && Path::new("/proc/self").exists()
                && !Path::new(&format!("/proc/{pid}")).exists()
        }
        None => false,
    }
}

/// Takes the group's and others' permissions off `path` and, with `with_entries`, off the files
/// directly in it (not deeper, and symbolic links are not followed: a data directory set to a
/// wrong place must not have a whole tree changed). A missing path is no error. Returns the
/// paths changed and the first error met (the rest is still done).
pub fn tighten(path: &Path, with_entries: bool) -> (Vec<PathBuf>, Option<io::Error>) {
    let mut changed = Vec::new();
    let mut first_err = None;
    let mut todo = vec![path.to_path_buf()];
    if with_entries {
        match std::fs::read_dir(path) {
            Ok(rd) => todo.extend(rd.filter_map(|e| e.ok()).map(|e| e.path())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => first_err = Some(e),
        }
    }
    for (i, p) in todo.into_iter().enumerate() {
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                first_err.get_or_insert(e);
                continue;
            }
        };
        // the entries: plain files only
        if i > 0 && !meta.is_file() {
            continue;
        }
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode & !0o077)) {
                Ok(()) => changed.push(p),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
    }
    (changed, first_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_private_and_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        create_dir_private(&sub).unwrap();
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&sub), 0o700);
        let f = sub.join("x.json");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        assert_eq!(mode(&f), 0o600);
        let log = sub.join("log");
        writeln!(open_append_private(&log).unwrap(), "line").unwrap();
        assert_eq!(mode(&log), 0o600);
        // nothing but the two files: no temp left behind
        assert_eq!(std::fs::read_dir(&sub).unwrap().count(), 2);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.json");
        write_atomic(&f, b"old").unwrap();
        // renaming a file over a directory fails after the temp file was written
        let d = dir.path().join("d");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("keep"), b"").unwrap();
        assert!(write_atomic(&d, b"new").is_err());
        assert_eq!(std::fs::read(&f).unwrap(), b"old");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(TEMP_SUFFIX)), "{names:?}");
    }

    #[test]
    fn tighten_takes_group_and_other_bits_off_a_dir_and_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        let conv = root.join("conversations");
        std::fs::create_dir_all(conv.join("deeper")).unwrap();
        std::fs::write(conv.join("a.json"), b"{}").unwrap();
        std::fs::write(root.join("other.txt"), b"").unwrap();
        for (p, m) in [
            (root.clone(), 0o755),
            (conv.clone(), 0o775),
            (conv.join("a.json"), 0o644),
            (conv.join("deeper"), 0o755),
            (root.join("other.txt"), 0o644),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        let (mut changed, err) = tighten(&root, false);
        assert!(err.is_none(), "{err:?}");
        let (more, err) = tighten(&conv, true);
        assert!(err.is_none(), "{err:?}");
        changed.extend(more);
        assert_eq!(changed.len(), 3, "{changed:?}");
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&conv), 0o700);
        assert_eq!(mode(&conv.join("a.json")), 0o600);
        // what slimchat did not name is left alone
        assert_eq!(mode(&conv.join("deeper")), 0o755);
        assert_eq!(mode(&root.join("other.txt")), 0o644);
        assert!(
            tighten(&conv, true).0.is_empty(),
            "a second pass changes nothing"
        );
        assert!(tighten(&root.join("missing"), true).1.is_none());
    }

    #[test]
    fn stale_temps_are_those_of_dead_writers() {
        let mine = temp_path(Path::new("/x/c.json"));
        let mine = mine.file_name().unwrap().to_str().unwrap();
        assert!(!stale_temp(mine), "this process is alive");
        assert!(stale_temp(".c.json.4000000000.0.tmp") || !Path::new("/proc/self").exists());
        assert!(!stale_temp("c.json"));
        assert!(!stale_temp(".c.json.notapid.0.tmp"));
    }
}
