//! Unpacking an artifact into a fresh directory, refusing anything that
//! could reach outside it: absolute paths, `..`, symlinks that resolve
//! outside (also through chains of symlinks), hard links to anything but
//! a file already unpacked, writing through a symlink, device files and
//! named pipes. Nothing is extracted by path as written: every entry is
//! checked, then created with `create_new` under the destination.
//!
//! Errors tell bad input (exit 2: corrupt archive, unsafe entry) from an
//! operation that failed (exit 1: a write failed, e.g. the disk is full).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use super::ReleaseError;

/// Symlinks followed while resolving one before giving up (as Linux).
const MAX_HOPS: usize = 40;

/// What was unpacked.
#[derive(Debug, Clone, Default)]
pub struct Installed {
    pub dir: PathBuf,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Dir,
    TarGz,
    TarZst,
    Tar,
}

/// What the artifact is, by its content (not its name).
pub(super) fn sniff(artifact: &Path) -> Result<Kind, ReleaseError> {
    let meta = std::fs::metadata(artifact).map_err(|source| ReleaseError::ArtifactMissing {
        path: artifact.to_owned(),
        source,
    })?;
    if meta.is_dir() {
        return Ok(Kind::Dir);
    }
    let read_err = |source| ReleaseError::ReadArtifact {
        artifact: artifact.to_owned(),
        path: artifact.to_owned(),
        source,
    };
    let mut head = Vec::with_capacity(512);
    File::open(artifact)
        .map_err(read_err)?
        .take(512)
        .read_to_end(&mut head)
        .map_err(read_err)?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Kind::TarGz)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Kind::TarZst)
    } else if head.get(257..262) == Some(b"ustar") {
        Ok(Kind::Tar)
    } else {
        Err(ReleaseError::UnknownKind {
            path: artifact.to_owned(),
        })
    }
}

/// A directory artifact must not contain the releases, nor be inside them
/// (copying would recurse, or deploy a release from itself).
pub(super) fn refuse_overlap(artifact: &Path, releases: &Path) -> Result<(), ReleaseError> {
    if sniff(artifact)? != Kind::Dir {
        return Ok(());
    }
    let (Ok(a), Ok(r)) = (artifact.canonicalize(), releases.canonicalize()) else {
        return Ok(());
    };
    if a.starts_with(&r) || r.starts_with(&a) {
        return Err(ReleaseError::BadArtifact {
            path: artifact.to_owned(),
            why: "a directory artifact must be outside the releases directory",
        });
    }
    Ok(())
}

/// Unpacks `artifact` into the empty directory `dest`, then checks the
/// whole tree once more (symlink chains).
pub(super) fn unpack(artifact: &Path, dest: &Path) -> Result<Installed, ReleaseError> {
    let open = || {
        File::open(artifact).map_err(|source| ReleaseError::ReadArtifact {
            artifact: artifact.to_owned(),
            path: artifact.to_owned(),
            source,
        })
    };
    let mut out = Unpacker::new(artifact, dest);
    match sniff(artifact)? {
        Kind::Dir => out.copy_dir(artifact, Path::new(""))?,
        Kind::Tar => out.tar(io::BufReader::new(open()?))?,
        Kind::TarGz => out.tar(flate2::read::MultiGzDecoder::new(io::BufReader::new(
            open()?
        )))?,
        Kind::TarZst => {
            let decoder = zstd::stream::read::Decoder::new(open()?).map_err(|source| {
                ReleaseError::Corrupt {
                    path: artifact.to_owned(),
                    source,
                }
            })?;
            out.tar(decoder)?
        }
    }
    out.finish()
}

/// The relative path an entry names, or why it is refused. `Ok(None)` is
/// the root itself (`./`).
pub fn safe_relative(path: &Path) -> Result<Option<PathBuf>, &'static str> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("has a `..` component"),
            Component::RootDir | Component::Prefix(_) => return Err("is an absolute path"),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// A symlink at `link` (relative to the release) to `target` must stay
/// inside the release as written; [`resolves_inside`] then checks it
/// through any chain of symlinks once everything is unpacked.
pub fn check_symlink_target(link: &Path, target: &Path) -> Result<(), &'static str> {
    if target.as_os_str().is_empty() {
        return Err("is a symlink with an empty target");
    }
    let mut depth = link.components().count().saturating_sub(1);
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth = depth
                    .checked_sub(1)
                    .ok_or("is a symlink pointing outside the release")?
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err("is a symlink to an absolute path")
            }
        }
    }
    Ok(())
}

enum Step {
    Up,
    Name(OsString),
    Root,
}

fn steps(path: &Path) -> impl Iterator<Item = Step> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(n) => Some(Step::Name(n.to_owned())),
        Component::ParentDir => Some(Step::Up),
        Component::CurDir => None,
        Component::RootDir | Component::Prefix(_) => Some(Step::Root),
    })
}

/// Whether following `target` from directory `from` (both relative to
/// `root`) stays inside `root`, following every symlink on the way as the
/// kernel would. Missing components are taken as written. A `..` is
/// applied to the directory actually reached, so `x -> y/..` with
/// `y -> .` is caught although `y/..` looks harmless.
pub fn resolves_inside(root: &Path, from: &Path, target: &Path) -> bool {
    let mut at: Vec<OsString> = from
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            _ => None,
        })
        .collect();
    let mut pending: VecDeque<Step> = steps(target).collect();
    let mut hops = 0;
    while let Some(step) = pending.pop_front() {
        match step {
            Step::Root => return false,
            Step::Up => {
                if at.pop().is_none() {
                    return false;
                }
            }
            Step::Name(name) => {
                let mut here = root.to_path_buf();
                here.extend(&at);
                here.push(&name);
                match here.symlink_metadata() {
                    Ok(m) if m.file_type().is_symlink() => {
                        hops += 1;
                        let Ok(next) = std::fs::read_link(&here) else {
                            return false;
                        };
                        if hops > MAX_HOPS {
                            return false;
                        }
                        for s in steps(&next).collect::<Vec<_>>().into_iter().rev() {
                            pending.push_front(s);
                        }
                    }
                    _ => at.push(name),
                }
            }
        }
    }
    true
}

/// A writer that remembers whether writing failed, so a failed copy can
/// be blamed on the archive (bad input) or the disk (operation failed).
struct Tagged<W> {
    inner: W,
    failed: bool,
}

impl<W: Write> Write for Tagged<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).inspect_err(|_| self.failed = true)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().inspect_err(|_| self.failed = true)
    }
}

struct Unpacker<'a> {
    artifact: &'a Path,
    dest: &'a Path,
    counts: Installed,
    /// Directory modes, applied last (a read-only directory must still
    /// receive its entries).
    dir_modes: Vec<(PathBuf, u32)>,
}

impl<'a> Unpacker<'a> {
    fn new(artifact: &'a Path, dest: &'a Path) -> Self {
        Self {
            artifact,
            dest,
            counts: Installed::default(),
            dir_modes: Vec::new(),
        }
    }

    fn unsafe_entry(&self, entry: &Path, why: impl Into<String>) -> ReleaseError {
        ReleaseError::Unsafe {
            artifact: self.artifact.to_owned(),
            entry: entry.to_owned(),
            why: why.into(),
        }
    }

    fn corrupt(&self, source: io::Error) -> ReleaseError {
        ReleaseError::Corrupt {
            path: self.artifact.to_owned(),
            source,
        }
    }

    fn write_err(&self, what: &'static str, path: &Path, source: io::Error) -> ReleaseError {
        ReleaseError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }

    /// Creates the missing directories above `rel`, refusing to go through
    /// a symlink or a file.
    fn parents(&mut self, rel: &Path) -> Result<(), ReleaseError> {
        let mut here = self.dest.to_path_buf();
        let mut sofar = PathBuf::new();
        let parents: Vec<_> = rel
            .parent()
            .map(|p| p.components().collect())
            .unwrap_or_default();
        for c in parents {
            here.push(c);
            sofar.push(c);
            match here.symlink_metadata() {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(self.unsafe_entry(
                        rel,
                        format!("goes through the symlink {}", sofar.display()),
                    ))
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(self.unsafe_entry(
                        rel,
                        format!("is inside {}, which is not a directory", sofar.display()),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    std::fs::create_dir(&here).map_err(|e| self.write_err("creating", &here, e))?;
                    self.counts.dirs += 1;
                }
                Err(e) => return Err(self.write_err("reading", &here, e)),
            }
        }
        Ok(())
    }

    /// Where `rel` goes, once its parents exist; refuses a path that is
    /// already taken (an entry appearing twice), except a directory again.
    fn place(&mut self, rel: &Path, is_dir: bool) -> Result<Option<PathBuf>, ReleaseError> {
        self.parents(rel)?;
        let path = self.dest.join(rel);
        match path.symlink_metadata() {
            Ok(m) if is_dir && m.is_dir() => Ok(None),
            Ok(_) => Err(self.unsafe_entry(rel, "appears twice")),
            Err(_) => Ok(Some(path)),
        }
    }

    fn dir(&mut self, rel: &Path, mode: u32) -> Result<(), ReleaseError> {
        if let Some(path) = self.place(rel, true)? {
            std::fs::create_dir(&path).map_err(|e| self.write_err("creating", &path, e))?;
            self.counts.dirs += 1;
        }
        self.dir_modes.push((self.dest.join(rel), mode));
        Ok(())
    }

    /// A regular file from `content`; a read error is the artifact's, a
    /// write error the disk's.
    fn file(
        &mut self,
        rel: &Path,
        mode: u32,
        mtime: Option<u64>,
        content: &mut dyn Read,
        read_error: &dyn Fn(io::Error) -> ReleaseError,
    ) -> Result<(), ReleaseError> {
        let Some(path) = self.place(rel, false)? else {
            return Err(self.unsafe_entry(rel, "appears twice"));
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| self.write_err("creating", &path, e))?;
        let mut out = Tagged {
            inner: file,
            failed: false,
        };
        match io::copy(content, &mut out) {
            Ok(n) => self.counts.bytes += n,
            Err(e) if out.failed => return Err(self.write_err("writing", &path, e)),
            Err(e) => return Err(read_error(e)),
        }
        let file = out.inner;
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| self.write_err("setting the mode of", &path, e))?;
        if let Some(secs) = mtime {
            // Best effort: apps may use mtimes (ETags), nothing depends on it.
            let _ = file.set_modified(UNIX_EPOCH + Duration::from_secs(secs));
        }
        self.counts.files += 1;
        Ok(())
    }

    fn symlink(&mut self, rel: &Path, target: &Path) -> Result<(), ReleaseError> {
        check_symlink_target(rel, target).map_err(|why| self.unsafe_entry(rel, why))?;
        let Some(path) = self.place(rel, false)? else {
            return Err(self.unsafe_entry(rel, "appears twice"));
        };
        std::os::unix::fs::symlink(target, &path)
            .map_err(|e| self.write_err("creating the symlink", &path, e))?;
        self.counts.symlinks += 1;
        Ok(())
    }

    /// A hard link must name a regular file already unpacked, reached
    /// without going through a symlink.
    fn hard_link(&mut self, rel: &Path, target: &Path) -> Result<(), ReleaseError> {
        let to = match safe_relative(target) {
            Ok(Some(to)) => to,
            Ok(None) => return Err(self.unsafe_entry(rel, "is a hard link to a directory")),
            Err(why) => {
                return Err(self.unsafe_entry(rel, format!("is a hard link whose target {why}")))
            }
        };
        let mut here = self.dest.to_path_buf();
        for c in to.components() {
            here.push(c);
            if here
                .symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink())
            {
                return Err(self.unsafe_entry(rel, "is a hard link through a symlink"));
            }
        }
        if !here.symlink_metadata().is_ok_and(|m| m.is_file()) {
            return Err(self.unsafe_entry(
                rel,
                format!(
                    "is a hard link to {}, which is not a file unpacked before it",
                    to.display()
                ),
            ));
        }
        let Some(path) = self.place(rel, false)? else {
            return Err(self.unsafe_entry(rel, "appears twice"));
        };
        std::fs::hard_link(&here, &path).map_err(|e| self.write_err("linking", &path, e))?;
        self.counts.files += 1;
        Ok(())
    }

    fn tar<R: Read>(&mut self, reader: R) -> Result<(), ReleaseError> {
        use tar::EntryType as T;
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(|e| self.corrupt(e))?;
        let mut any = false;
        for entry in entries {
            let mut entry = entry.map_err(|e| self.corrupt(e))?;
            any = true;
            let raw = entry.path().map_err(|e| self.corrupt(e))?.into_owned();
            let kind = entry.header().entry_type();
            // Extensions the tar crate applies itself (long names, pax).
            if matches!(
                kind,
                T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
            ) {
                continue;
            }
            let rel = match safe_relative(&raw) {
                Ok(Some(rel)) => rel,
                Ok(None) if kind == T::Directory => continue,
                Ok(None) => return Err(self.unsafe_entry(&raw, "names the release itself")),
                Err(why) => return Err(self.unsafe_entry(&raw, why)),
            };
            let mode = entry.header().mode().map_err(|e| self.corrupt(e))? & 0o777;
            match kind {
                T::Directory => self.dir(&rel, mode)?,
                T::Regular | T::Continuous | T::GNUSparse => {
                    let mtime = entry.header().mtime().ok();
                    let artifact = self.artifact.to_owned();
                    let read_error = move |source| ReleaseError::Corrupt {
                        path: artifact.clone(),
                        source,
                    };
                    self.file(&rel, mode, mtime, &mut entry, &read_error)?
                }
                T::Symlink | T::Link => {
                    let target = entry
                        .link_name()
                        .map_err(|e| self.corrupt(e))?
                        .ok_or_else(|| self.unsafe_entry(&rel, "is a link without a target"))?
                        .into_owned();
                    if kind == T::Symlink {
                        self.symlink(&rel, &target)?
                    } else {
                        self.hard_link(&rel, &target)?
                    }
                }
                T::Char | T::Block => return Err(self.unsafe_entry(&rel, "is a device file")),
                T::Fifo => return Err(self.unsafe_entry(&rel, "is a named pipe")),
                other => {
                    return Err(
                        self.unsafe_entry(&rel, format!("has an unsupported type ({other:?})"))
                    )
                }
            }
        }
        if !any {
            return Err(self.corrupt(io::Error::new(
                io::ErrorKind::InvalidData,
                "the archive has no entries",
            )));
        }
        Ok(())
    }

    /// Copies the directory artifact `src/rel` (symlinks as symlinks,
    /// checked like an archive's).
    fn copy_dir(&mut self, src: &Path, rel: &Path) -> Result<(), ReleaseError> {
        let dir = src.join(rel);
        let artifact: &Path = self.artifact;
        let read_err = |path: &Path| {
            let path = path.to_owned();
            move |source| ReleaseError::ReadArtifact {
                artifact: artifact.to_owned(),
                path: path.clone(),
                source,
            }
        };
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(read_err(&dir))?
            .collect::<Result<_, _>>()
            .map_err(read_err(&dir))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let rel = rel.join(entry.file_name());
            let meta = path.symlink_metadata().map_err(read_err(&path))?;
            let ft = meta.file_type();
            let mode = meta.permissions().mode() & 0o777;
            if ft.is_symlink() {
                let target = std::fs::read_link(&path).map_err(read_err(&path))?;
                self.symlink(&rel, &target)?;
            } else if ft.is_dir() {
                self.dir(&rel, mode)?;
                self.copy_dir(src, &rel)?;
            } else if ft.is_file() {
                let mut content = File::open(&path).map_err(read_err(&path))?;
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs());
                let read_error = read_err(&path);
                self.file(&rel, mode, mtime, &mut content, &read_error)?;
            } else {
                use std::os::unix::fs::FileTypeExt;
                let why = if ft.is_block_device() || ft.is_char_device() {
                    "is a device file"
                } else if ft.is_fifo() {
                    "is a named pipe"
                } else {
                    "is a socket"
                };
                return Err(self.unsafe_entry(&rel, why));
            }
        }
        Ok(())
    }

    /// Checks every symlink through chains, then applies directory modes
    /// (deepest first; the owner keeps full access so a release can
    /// always be pruned).
    fn finish(mut self) -> Result<Installed, ReleaseError> {
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let dir = self.dest.join(&rel);
            let entries =
                std::fs::read_dir(&dir).map_err(|e| self.write_err("reading", &dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| self.write_err("reading", &dir, e))?;
                let child = rel.join(entry.file_name());
                let ft = entry
                    .file_type()
                    .map_err(|e| self.write_err("reading", &entry.path(), e))?;
                if ft.is_dir() {
                    stack.push(child);
                } else if ft.is_symlink() {
                    let target = std::fs::read_link(entry.path())
                        .map_err(|e| self.write_err("reading", &entry.path(), e))?;
                    if !resolves_inside(self.dest, &rel, &target) {
                        return Err(self.unsafe_entry(
                            &child,
                            format!(
                                "is a symlink to {} that resolves outside the release",
                                target.display()
                            ),
                        ));
                    }
                }
            }
        }
        self.dir_modes
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (path, mode) in std::mem::take(&mut self.dir_modes) {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode | 0o700))
                .map_err(|e| self.write_err("setting the mode of", &path, e))?;
        }
        Ok(self.counts)
    }
}
