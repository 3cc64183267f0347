//! Releases side by side under a releases root `DIR` (`releases_dir`):
//!
//! ```text
//! DIR/releases/NAME/    one unpacked artifact each (the app's tree, as shipped)
//! DIR/meta/NAME.json    when it was deployed, from what, and how that went
//! DIR/current           symlink to releases/NAME: the app's working directory
//! DIR/.lock             held by one deploy at a time
//! ```
//!
//! Every change is atomic: a release is unpacked into
//! `releases/.tmp-NAME-XXXXXX` and renamed into place (never over an
//! existing one), `current` is switched by renaming a fresh symlink over
//! it, and a pruned release is renamed aside before it is deleted. The
//! metadata lives beside the releases, not in them, so the app's tree is
//! exactly the artifact. The supervisor knows none of this: `baton deploy`
//! does it client-side, then asks for an ordinary upgrade.

mod unpack;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use unpack::{check_symlink_target, resolves_inside, safe_relative, Installed};

/// Releases kept by pruning (besides the active and previous ones).
pub const DEFAULT_KEEP_RELEASES: u32 = 5;
const MAX_NAME: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("artifact {}: not found", .path.display())]
    ArtifactMissing {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("artifact {}: not a .tar.gz, .tar.zst or .tar archive, nor a directory", .path.display())]
    UnknownKind { path: PathBuf },
    #[error("artifact {}: corrupt archive", .path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("artifact {}: reading {}", .artifact.display(), .path.display())]
    ReadArtifact {
        artifact: PathBuf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("artifact {}: entry {:?} {why}; nothing was deployed", .artifact.display(), .entry)]
    Unsafe {
        artifact: PathBuf,
        entry: PathBuf,
        why: String,
    },
    #[error("artifact {}: {why}", .path.display())]
    BadArtifact { path: PathBuf, why: &'static str },
    #[error("bad release name {0:?}: use 1-128 letters, digits, '.', '_', '+' or '-', not starting with '.' or '-'")]
    BadName(String),
    #[error("release {name:?} already exists in {}; deploy under another --name", .dir.display())]
    Exists { name: String, dir: PathBuf },
    #[error("{} exists and is not a symlink; move it away (baton switches releases by repointing it)", .0.display())]
    CurrentNotSymlink(PathBuf),
    #[error("another deploy is running (it holds {})", .0.display())]
    Locked(PathBuf),
    #[error("{what} {}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ReleaseError {
    /// Bad input (exit 2) rather than an operation that failed (exit 1).
    pub fn is_usage(&self) -> bool {
        !matches!(self, Self::Io { .. } | Self::Locked(_))
    }

    fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io { what, path, source }
    }
}

/// How a deploy of a release went, as recorded beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployOutcome {
    /// Unpacked; the upgrade has not reported yet (or the deploy was cut short).
    Pending,
    /// Unpacked and made `current` without an upgrade (`--no-upgrade`).
    Staged,
    /// Runs as a canary, waiting for `baton promote` or `baton rollback`.
    Canary,
    Succeeded,
    Failed,
}

/// `DIR/meta/NAME.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub name: String,
    /// The artifact it was unpacked from, as given.
    pub artifact: String,
    /// RFC 3339, UTC.
    pub deployed_at: String,
    pub deployed_unix_ms: u64,
    pub outcome: DeployOutcome,
    #[serde(default)]
    pub generation: Option<u64>,
    #[serde(default)]
    pub reason: Option<String>,
}

impl Meta {
    pub fn new(name: &str, artifact: &Path) -> Self {
        let now = SystemTime::now();
        Self {
            name: name.to_owned(),
            artifact: artifact.display().to_string(),
            deployed_at: humantime::format_rfc3339_seconds(now).to_string(),
            deployed_unix_ms: now
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            outcome: DeployOutcome::Pending,
            generation: None,
            reason: None,
        }
    }
}

/// One release found on disk.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: String,
    pub dir: PathBuf,
    pub meta: Option<Meta>,
    /// From the metadata, else the directory's mtime (a release put there
    /// by hand).
    pub deployed_unix_ms: u64,
}

/// Proof that this process holds `DIR/.lock`: everything that changes the
/// releases root takes it, so two deploys never interleave.
pub struct DeployLock {
    _lock: nix::fcntl::Flock<File>,
}

/// A releases root.
#[derive(Debug, Clone)]
pub struct Releases {
    root: PathBuf,
}

/// `releases/NAME` names: safe as one path component and in a shell.
pub fn validate_name(name: &str) -> Result<(), ReleaseError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ReleaseError::BadName(name.to_owned()))
    }
}

/// The release name an artifact suggests: its file name without the
/// archive suffix (`app-v42.tar.gz` → `app-v42`), if that is a valid name.
pub fn name_from_artifact(artifact: &Path) -> Option<String> {
    let file = artifact.file_name()?.to_str()?;
    let stem = [".tar.gz", ".tgz", ".tar.zst", ".tar.zstd", ".tzst", ".tar"]
        .iter()
        .find_map(|suffix| file.strip_suffix(suffix))
        .unwrap_or(file);
    validate_name(stem).is_ok().then(|| stem.to_owned())
}

/// A name from the time, for artifacts whose name suggests none:
/// `20261123T001652.123Z`.
pub fn timestamp_name() -> String {
    humantime::format_rfc3339_millis(SystemTime::now())
        .to_string()
        .replace(['-', ':'], "")
}

impl Releases {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn releases_dir(&self) -> PathBuf {
        self.root.join("releases")
    }

    pub fn release(&self, name: &str) -> PathBuf {
        self.releases_dir().join(name)
    }

    pub fn current(&self) -> PathBuf {
        self.root.join("current")
    }

    fn meta_dir(&self) -> PathBuf {
        self.root.join("meta")
    }

    fn meta_path(&self, name: &str) -> PathBuf {
        self.meta_dir().join(format!("{name}.json"))
    }

    /// Creates the layout's directories if needed and takes the deploy lock
    /// (without waiting: a second deploy is told at once).
    pub fn lock(&self) -> Result<DeployLock, ReleaseError> {
        for dir in [self.releases_dir(), self.meta_dir()] {
            std::fs::create_dir_all(&dir)
                .map_err(ReleaseError::io("creating the releases directory", &dir))?;
        }
        let path = self.root.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(ReleaseError::io("opening the deploy lock", &path))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(DeployLock { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(ReleaseError::Locked(path)),
            Err((_, e)) => Err(ReleaseError::Io {
                what: "taking the deploy lock",
                path,
                source: e.into(),
            }),
        }
    }

    /// Whether a release (or its metadata) of that name exists.
    pub fn exists(&self, name: &str) -> bool {
        self.release(name).symlink_metadata().is_ok() || self.meta_path(name).exists()
    }

    /// Checks everything about a deploy of `artifact` as `name` that can
    /// be checked without unpacking it: nothing is written.
    pub fn preflight(&self, artifact: &Path, name: &str) -> Result<(), ReleaseError> {
        validate_name(name)?;
        unpack::sniff(artifact)?;
        if self.exists(name) {
            return Err(ReleaseError::Exists {
                name: name.to_owned(),
                dir: self.releases_dir(),
            });
        }
        self.current_link()?;
        Ok(())
    }

    /// Unpacks (or copies) `artifact` into `releases/NAME`: into a temporary
    /// directory first, checked whole, then renamed into place. On any
    /// error the temporary directory is removed and nothing else changed.
    pub fn install(
        &self,
        artifact: &Path,
        name: &str,
        _lock: &DeployLock,
    ) -> Result<Installed, ReleaseError> {
        self.preflight(artifact, name)?;
        let releases = self.releases_dir();
        unpack::refuse_overlap(artifact, &releases)?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".tmp-{name}-"))
            .tempdir_in(&releases)
            .map_err(ReleaseError::io(
                "creating a temporary directory in",
                &releases,
            ))?;
        let counts = unpack::unpack(artifact, tmp.path())?;
        // tempdir() makes it 0700; the app (maybe another user) must read it.
        set_mode(tmp.path(), 0o755)?;
        sync_dir_fs(tmp.path())?;
        let target = self.release(name);
        match nix::fcntl::renameat2(
            None,
            tmp.path(),
            None,
            &target,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => {}
            Err(nix::errno::Errno::EEXIST) => {
                return Err(ReleaseError::Exists {
                    name: name.to_owned(),
                    dir: releases,
                })
            }
            Err(e) => {
                return Err(ReleaseError::Io {
                    what: "moving the unpacked release into place at",
                    path: target,
                    source: e.into(),
                })
            }
        }
        // Renamed away: nothing left for the guard to remove.
        let _ = tmp.keep();
        sync_dir(&releases)?;
        Ok(Installed {
            dir: target,
            ..counts
        })
    }

    /// What `current` points to (the link's text), if it exists; an error
    /// if something other than a symlink is in the way.
    pub fn current_link(&self) -> Result<Option<PathBuf>, ReleaseError> {
        let current = self.current();
        match current.symlink_metadata() {
            Ok(m) if m.file_type().is_symlink() => std::fs::read_link(&current)
                .map(Some)
                .map_err(ReleaseError::io("reading", &current)),
            Ok(_) => Err(ReleaseError::CurrentNotSymlink(current)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ReleaseError::Io {
                what: "reading",
                path: current,
                source: e,
            }),
        }
    }

    /// The release `current` points to, if it points to one.
    pub fn current_name(&self) -> Result<Option<String>, ReleaseError> {
        Ok(self
            .current_link()?
            .and_then(|link| self.name_of(&self.root.join(link))))
    }

    /// Points `current` at `releases/NAME`, atomically.
    pub fn point_current(&self, name: &str, lock: &DeployLock) -> Result<(), ReleaseError> {
        self.set_current(Some(&Path::new("releases").join(name)), lock)
    }

    /// Sets `current` to the link text `target` (atomically: a new symlink
    /// renamed over the old one), or removes it.
    pub fn set_current(
        &self,
        target: Option<&Path>,
        _lock: &DeployLock,
    ) -> Result<(), ReleaseError> {
        let current = self.current();
        self.current_link()?;
        match target {
            Some(target) => {
                let tmp = self.root.join(format!(".current.{}", std::process::id()));
                // A leftover from a deploy that was killed here (we hold the lock).
                let _ = std::fs::remove_file(&tmp);
                std::os::unix::fs::symlink(target, &tmp)
                    .map_err(ReleaseError::io("creating the symlink", &tmp))?;
                if let Err(source) = std::fs::rename(&tmp, &current) {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(ReleaseError::Io {
                        what: "repointing",
                        path: current,
                        source,
                    });
                }
            }
            None => match std::fs::remove_file(&current) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ReleaseError::Io {
                        what: "removing",
                        path: current,
                        source,
                    })
                }
            },
        }
        sync_dir(&self.root)
    }

    /// The release name of a directory (as `status` reports it, resolved)
    /// if it is one of this root's releases.
    pub fn name_of(&self, dir: &Path) -> Option<String> {
        let releases = self.releases_dir();
        let releases = releases.canonicalize().unwrap_or(releases);
        let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
        let rest = dir.strip_prefix(&releases).ok()?;
        let mut parts = rest.components();
        let name = parts.next()?.as_os_str().to_str()?.to_owned();
        (parts.next().is_none() && validate_name(&name).is_ok()).then_some(name)
    }

    pub fn read_meta(&self, name: &str) -> Option<Meta> {
        let text = std::fs::read(self.meta_path(name)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Writes a release's metadata (atomically: a temp file renamed).
    pub fn write_meta(&self, meta: &Meta, _lock: &DeployLock) -> Result<(), ReleaseError> {
        let path = self.meta_path(&meta.name);
        let tmp = self.meta_dir().join(format!(".{}.tmp", meta.name));
        let mut text = serde_json::to_vec_pretty(meta).unwrap_or_default();
        text.push(b'\n');
        std::fs::write(&tmp, text).map_err(ReleaseError::io("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(ReleaseError::io("writing", &path))
    }

    /// Every release on disk, newest first.
    pub fn list(&self) -> Result<Vec<Listed>, ReleaseError> {
        let dir = self.releases_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(ReleaseError::Io {
                    what: "listing",
                    path: dir,
                    source,
                })
            }
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(ReleaseError::io("listing", &dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            // Temporary and half-deleted releases start with '.'.
            if validate_name(&name).is_err() {
                continue;
            }
            let Ok(m) = entry.path().symlink_metadata() else {
                continue;
            };
            if !m.is_dir() {
                continue;
            }
            let meta = self.read_meta(&name);
            let deployed_unix_ms = meta.as_ref().map_or_else(
                || {
                    m.modified()
                        .ok()
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_millis() as u64)
                },
                |m| m.deployed_unix_ms,
            );
            out.push(Listed {
                dir: entry.path(),
                name,
                meta,
                deployed_unix_ms,
            });
        }
        out.sort_by(|a, b| {
            b.deployed_unix_ms
                .cmp(&a.deployed_unix_ms)
                .then_with(|| b.name.cmp(&a.name))
        });
        Ok(out)
    }

    /// Removes a release and its metadata: renamed aside first, so it is
    /// never seen half-deleted.
    pub fn remove(&self, name: &str, _lock: &DeployLock) -> Result<(), ReleaseError> {
        let dir = self.release(name);
        let aside = self.releases_dir().join(format!(".del-{name}"));
        // A leftover of a removal that was killed midway would be in the way.
        remove_tree(&aside)?;
        if dir.symlink_metadata().is_ok() {
            std::fs::rename(&dir, &aside).map_err(ReleaseError::io("removing", &dir))?;
        }
        match std::fs::remove_file(self.meta_path(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ReleaseError::Io {
                    what: "removing",
                    path: self.meta_path(name),
                    source,
                })
            }
        }
        remove_tree(&aside)
    }

    /// Keeps the `keep` newest releases and every one named in `protect`
    /// (the active, previous, parked ones and `current`'s target: the
    /// caller's to say), and removes the rest, oldest first. Leftovers of
    /// deploys that were killed midway (`.tmp-*`, `.del-*`) go too: the
    /// lock says no deploy is running. Returns the names removed.
    pub fn prune(
        &self,
        keep: usize,
        protect: &[String],
        lock: &DeployLock,
    ) -> Result<Vec<String>, ReleaseError> {
        let mut removed = Vec::new();
        let listed = self.list()?;
        for (i, r) in listed.iter().enumerate().rev() {
            if i < keep || protect.contains(&r.name) {
                continue;
            }
            self.remove(&r.name, lock)?;
            removed.push(r.name.clone());
        }
        let dir = self.releases_dir();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(".tmp-") || name.starts_with(".del-") {
                    remove_tree(&entry.path())?;
                }
            }
        }
        Ok(removed)
    }
}

fn remove_tree(path: &Path) -> Result<(), ReleaseError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ReleaseError::Io {
            what: "removing",
            path: path.to_owned(),
            source,
        }),
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ReleaseError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(ReleaseError::io("setting the mode of", path))
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), ReleaseError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ReleaseError::io("syncing", dir))
}

/// Flushes the unpacked files before they are renamed into place, so a
/// crash never leaves a release with empty files behind its name: one
/// `syncfs` instead of an fsync per file.
fn sync_dir_fs(dir: &Path) -> Result<(), ReleaseError> {
    use std::os::fd::AsRawFd;
    let d = File::open(dir).map_err(ReleaseError::io("syncing", dir))?;
    nix::unistd::syncfs(d.as_raw_fd()).map_err(|e| ReleaseError::Io {
        what: "syncing",
        path: dir.to_owned(),
        source: e.into(),
    })
}

#[cfg(test)]
mod tests;
