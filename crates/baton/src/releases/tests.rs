//! Path-safety and layout tests. Every refusal has a positive control: the
//! same shape of input, made harmless, is accepted.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::*;

/// A tar entry, written with raw header fields so the tests can build
/// archives the tar crate's own builder would refuse to write.
enum E<'a> {
    File(&'a str, &'a [u8], u32),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Device(&'a str),
    Fifo(&'a str),
}

fn raw_header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    let name = &mut h.as_old_mut().name;
    name[..path.len()].copy_from_slice(path.as_bytes());
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h
}

fn set_link(h: &mut tar::Header, target: &str) {
    let link = &mut h.as_old_mut().linkname;
    link[..target.len()].copy_from_slice(target.as_bytes());
}

fn tar_bytes(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let (mut h, data): (tar::Header, &[u8]) = match e {
            E::File(p, data, mode) => (
                raw_header(p, tar::EntryType::Regular, data.len() as u64, *mode),
                data,
            ),
            E::Dir(p) => (raw_header(p, tar::EntryType::Directory, 0, 0o755), &[]),
            E::Symlink(p, t) => {
                let mut h = raw_header(p, tar::EntryType::Symlink, 0, 0o777);
                set_link(&mut h, t);
                (h, &[])
            }
            E::Hard(p, t) => {
                let mut h = raw_header(p, tar::EntryType::Link, 0, 0o644);
                set_link(&mut h, t);
                (h, &[])
            }
            E::Device(p) => (raw_header(p, tar::EntryType::Char, 0, 0o600), &[]),
            E::Fifo(p) => (raw_header(p, tar::EntryType::Fifo, 0, 0o600), &[]),
        };
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    rel: Releases,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().to_owned();
        // A sentinel next to the releases root: nothing may ever reach it.
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::fs::write(base.join("outside/keep"), "untouched").unwrap();
        let rel = Releases::new(base.join("app"));
        Self {
            _tmp: tmp,
            base,
            rel,
        }
    }

    fn artifact(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.base.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn install(&self, artifact: &Path, name: &str) -> Result<Installed, ReleaseError> {
        let lock = self.rel.lock().unwrap();
        self.rel.install(artifact, name, &lock)
    }

    /// Nothing was deployed and nothing leaked: no release, no temporary
    /// directory left, the sentinel intact.
    fn assert_untouched(&self, name: &str) {
        assert!(!self.rel.release(name).exists(), "release {name} exists");
        let leftovers: Vec<_> = std::fs::read_dir(self.rel.releases_dir())
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            leftovers
                .iter()
                .all(|n| !n.to_string_lossy().starts_with(".tmp-")),
            "temporary directory left: {leftovers:?}"
        );
        let entries: Vec<_> = std::fs::read_dir(self.base.join("outside"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from("keep")]);
        assert_eq!(
            std::fs::read_to_string(self.base.join("outside/keep")).unwrap(),
            "untouched"
        );
    }
}

fn unsafe_why(r: Result<Installed, ReleaseError>) -> (PathBuf, String) {
    match r {
        Err(ReleaseError::Unsafe { entry, why, .. }) => (entry, why),
        other => panic!("expected an unsafe-entry refusal, got {other:?}"),
    }
}

#[test]
fn entry_paths_must_be_relative_and_stay_inside() {
    assert_eq!(
        safe_relative(Path::new("./bin/server")),
        Ok(Some(PathBuf::from("bin/server")))
    );
    assert_eq!(safe_relative(Path::new("./")), Ok(None));
    assert!(safe_relative(Path::new("../evil")).is_err());
    assert!(safe_relative(Path::new("a/../../evil")).is_err());
    assert!(
        safe_relative(Path::new("a/../b")).is_err(),
        "no `..` at all"
    );
    assert!(safe_relative(Path::new("/etc/passwd")).is_err());
}

#[test]
fn symlink_targets_are_checked_as_written() {
    let ok = |l: &str, t: &str| check_symlink_target(Path::new(l), Path::new(t));
    assert!(ok("lib/x", "../bin/y").is_ok(), "positive control");
    assert!(ok("a/b/c", "../../d").is_ok(), "positive control");
    assert!(ok("x", "./y").is_ok(), "positive control");
    assert!(ok("x", "../y").is_err());
    assert!(ok("a/b", "../../c").is_err());
    assert!(ok("a", "b/../../c").is_err());
    assert!(ok("x", "/etc/passwd").is_err());
    assert!(ok("x", "").is_err());
}

#[test]
fn symlink_chains_are_followed_like_the_kernel() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir(root.join("sub")).unwrap();
    std::os::unix::fs::symlink(".", root.join("dot")).unwrap();
    std::os::unix::fs::symlink("sub", root.join("s")).unwrap();
    // `dot/..` looks like the root itself, but `dot` is the root: its
    // parent is outside.
    assert!(check_symlink_target(Path::new("x"), Path::new("dot/..")).is_ok());
    assert!(!resolves_inside(root, Path::new(""), Path::new("dot/..")));
    assert!(!resolves_inside(root, Path::new(""), Path::new("dot/../x")));
    // Positive controls: the same chains that end inside.
    assert!(resolves_inside(root, Path::new(""), Path::new("s/..")));
    assert!(resolves_inside(root, Path::new(""), Path::new("dot/sub")));
    assert!(resolves_inside(
        root,
        Path::new("sub"),
        Path::new("../s/missing")
    ));
    // A loop never resolves.
    std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
    assert!(!resolves_inside(root, Path::new(""), Path::new("loop")));
}

#[test]
fn a_good_archive_is_unpacked_whole_with_modes_and_links() {
    let f = Fixture::new();
    let art = f.artifact(
        "app-v1.tar.gz",
        &gz(&tar_bytes(&[
            E::Dir("./"),
            E::Dir("./bin"),
            E::File("./bin/server", b"#!/bin/sh\n", 0o755),
            E::File("./VERSION", b"v1", 0o644),
            E::Symlink("./bin/version", "../VERSION"),
            E::Hard("./VERSION.copy", "./VERSION"),
            E::File("deep/er/file", b"implicit parents", 0o600),
        ])),
    );
    let got = f.install(&art, "v1").unwrap();
    let dir = f.rel.release("v1");
    assert_eq!(got.dir, dir);
    assert_eq!((got.files, got.symlinks), (4, 1));
    assert_eq!(
        std::fs::read_to_string(dir.join("bin/version")).unwrap(),
        "v1"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("VERSION.copy")).unwrap(),
        "v1"
    );
    let mode = |p: &str| std::fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("bin/server"), 0o755);
    assert_eq!(mode("deep/er/file"), 0o600);
    assert_eq!(mode(""), 0o755, "the release itself is readable by the app");
    f.assert_untouched("never-deployed");
}

#[test]
fn zstd_plain_tar_and_directories_are_artifacts_too() {
    let f = Fixture::new();
    let tar = tar_bytes(&[E::File("VERSION", b"v2", 0o644)]);
    let zst = f.artifact("a.tar.zst", &zstd::encode_all(&tar[..], 3).unwrap());
    f.install(&zst, "zst").unwrap();
    let plain = f.artifact("b.tar", &tar);
    f.install(&plain, "plain").unwrap();
    let src = f.base.join("srcdir");
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::write(src.join("bin/run"), "x").unwrap();
    std::fs::set_permissions(src.join("bin/run"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("bin/run", src.join("run")).unwrap();
    f.install(&src, "dir").unwrap();
    for (name, file, want) in [
        ("zst", "VERSION", "v2"),
        ("plain", "VERSION", "v2"),
        ("dir", "run", "x"),
    ] {
        assert_eq!(
            std::fs::read_to_string(f.rel.release(name).join(file)).unwrap(),
            want
        );
    }
    let mode = std::fs::metadata(f.rel.release("dir").join("bin/run"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o750);
}

#[test]
fn unsafe_archives_are_refused_naming_the_entry_and_leave_nothing() {
    let cases: &[(&str, Vec<E<'_>>, &str)] = &[
        ("../escape", vec![E::File("../escape", b"x", 0o644)], ".."),
        (
            "/etc/evil",
            vec![E::File("/etc/evil", b"x", 0o644)],
            "absolute",
        ),
        ("abs-link", vec![E::Symlink("abs-link", "/etc")], "absolute"),
        (
            "up-link",
            vec![E::Symlink("up-link", "../outside")],
            "outside",
        ),
        (
            "x",
            vec![E::Symlink("dot", "."), E::Symlink("x", "dot/../outside")],
            "resolves outside",
        ),
        (
            "through/file",
            vec![
                E::Dir("real"),
                E::Symlink("through", "real"),
                E::File("through/file", b"x", 0o644),
            ],
            "goes through the symlink",
        ),
        ("hard", vec![E::Hard("hard", "../outside/keep")], ".."),
        (
            "hard-abs",
            vec![E::Hard("hard-abs", "/etc/passwd")],
            "absolute",
        ),
        ("dev", vec![E::Device("dev")], "device"),
        ("pipe", vec![E::Fifo("pipe")], "named pipe"),
        (
            "twice",
            vec![E::File("twice", b"a", 0o644), E::File("twice", b"b", 0o644)],
            "twice",
        ),
    ];
    for (entry, entries, why) in cases {
        let f = Fixture::new();
        let art = f.artifact("bad.tar.gz", &gz(&tar_bytes(entries)));
        let (got_entry, got_why) = unsafe_why(f.install(&art, "bad"));
        assert_eq!(got_entry, Path::new(entry), "{why}");
        assert!(
            got_why.contains(why),
            "{entry}: {got_why:?} should say {why:?}"
        );
        f.assert_untouched("bad");
    }
    // Positive control: the same shapes, kept inside, are accepted.
    let f = Fixture::new();
    let art = f.artifact(
        "good.tar.gz",
        &gz(&tar_bytes(&[
            E::File("escape", b"x", 0o644),
            E::Symlink("up-link", "escape"),
            E::Dir("real"),
            E::Symlink("dot", "."),
            E::Symlink("x", "dot/escape"),
            E::File("real/file", b"x", 0o644),
            E::Hard("hard", "escape"),
        ])),
    );
    f.install(&art, "good").unwrap();
}

#[test]
fn directory_artifacts_are_checked_like_archives() {
    let f = Fixture::new();
    let src = f.base.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("ok"), "x").unwrap();
    std::os::unix::fs::symlink("../outside/keep", src.join("leak")).unwrap();
    let (entry, why) = unsafe_why(f.install(&src, "d"));
    assert_eq!(entry, Path::new("leak"));
    assert!(why.contains("outside"), "{why}");
    f.assert_untouched("d");
    std::fs::remove_file(src.join("leak")).unwrap();
    nix::unistd::mkfifo(&src.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let (entry, why) = unsafe_why(f.install(&src, "d"));
    assert_eq!(
        (entry.as_path(), why.as_str()),
        (Path::new("fifo"), "is a named pipe")
    );
    f.assert_untouched("d");
    std::fs::remove_file(src.join("fifo")).unwrap();
    f.install(&src, "d").unwrap();
    // The releases directory cannot be its own artifact.
    let err = f.install(f.rel.root(), "self").unwrap_err();
    assert!(matches!(err, ReleaseError::BadArtifact { .. }), "{err}");
}

#[test]
fn missing_corrupt_and_unknown_artifacts_are_usage_errors() {
    let f = Fixture::new();
    let good = gz(&tar_bytes(&[E::File("VERSION", &[b'v'; 4000], 0o644)]));
    let truncated = f.artifact("cut.tar.gz", &good[..good.len() / 2]);
    let err = f.install(&truncated, "cut").unwrap_err();
    assert!(matches!(err, ReleaseError::Corrupt { .. }), "{err:?}");
    assert!(err.is_usage());
    f.assert_untouched("cut");
    let noise = f.artifact("noise.tar.gz", b"this is not an archive at all");
    let err = f.install(&noise, "noise").unwrap_err();
    assert!(matches!(err, ReleaseError::UnknownKind { .. }), "{err:?}");
    assert!(err.to_string().contains("noise.tar.gz"), "{err}");
    let empty_gz = f.artifact("empty.tar.gz", &gz(b""));
    let err = f.install(&empty_gz, "empty").unwrap_err();
    assert!(matches!(err, ReleaseError::Corrupt { .. }), "{err:?}");
    let err = f.install(&f.base.join("nope.tar.gz"), "nope").unwrap_err();
    assert!(
        matches!(err, ReleaseError::ArtifactMissing { .. }),
        "{err:?}"
    );
    assert!(err.is_usage());
    // Positive control.
    let ok = f.artifact("ok.tar.gz", &good);
    f.install(&ok, "ok").unwrap();
}

#[test]
fn an_existing_release_is_never_overwritten() {
    let f = Fixture::new();
    let art = f.artifact("v1.tar.gz", &gz(&tar_bytes(&[E::File("V", b"1", 0o644)])));
    f.install(&art, "v1").unwrap();
    let other = f.artifact("v1b.tar.gz", &gz(&tar_bytes(&[E::File("V", b"2", 0o644)])));
    let err = f.install(&other, "v1").unwrap_err();
    assert!(matches!(err, ReleaseError::Exists { .. }), "{err:?}");
    assert!(err.is_usage());
    assert_eq!(
        std::fs::read_to_string(f.rel.release("v1").join("V")).unwrap(),
        "1"
    );
    // An empty directory of that name (which rename(2) would replace) too.
    std::fs::create_dir(f.rel.release("empty")).unwrap();
    let err = f.install(&other, "empty").unwrap_err();
    assert!(matches!(err, ReleaseError::Exists { .. }), "{err:?}");
}

#[test]
fn release_names() {
    for good in ["v42", "app-v42", "1.2.3+build.7", "2026_11_23"] {
        assert!(validate_name(good).is_ok(), "{good}");
    }
    for bad in [
        "",
        ".hidden",
        "-flag",
        "a/b",
        "..",
        "a b",
        "é",
        &"x".repeat(129),
    ] {
        assert!(validate_name(bad).is_err(), "{bad:?}");
    }
    let n = |p: &str| name_from_artifact(Path::new(p));
    assert_eq!(n("/ci/app-v42.tar.gz").as_deref(), Some("app-v42"));
    assert_eq!(n("app-v42.tar.zst").as_deref(), Some("app-v42"));
    assert_eq!(n("build/app-v43").as_deref(), Some("app-v43"));
    assert_eq!(n(".tar.gz"), None);
    assert!(validate_name(&timestamp_name()).is_ok());
}

#[test]
fn current_is_switched_atomically_and_never_over_a_directory() {
    let f = Fixture::new();
    let lock = f.rel.lock().unwrap();
    assert_eq!(f.rel.current_link().unwrap(), None);
    f.rel.point_current("v1", &lock).unwrap();
    assert_eq!(
        f.rel.current_link().unwrap(),
        Some(PathBuf::from("releases/v1"))
    );
    std::fs::create_dir_all(f.rel.release("v1")).unwrap();
    assert_eq!(f.rel.current_name().unwrap().as_deref(), Some("v1"));
    f.rel.set_current(None, &lock).unwrap();
    assert_eq!(f.rel.current_link().unwrap(), None);
    std::fs::create_dir(f.rel.current()).unwrap();
    let err = f.rel.point_current("v1", &lock).unwrap_err();
    assert!(matches!(err, ReleaseError::CurrentNotSymlink(_)), "{err:?}");
    assert!(f.rel.current().is_dir());
}

#[test]
fn one_deploy_at_a_time() {
    let f = Fixture::new();
    let first = f.rel.lock().unwrap();
    let err = f.rel.lock().err().unwrap();
    assert!(matches!(err, ReleaseError::Locked(_)), "{err:?}");
    assert!(!err.is_usage(), "exit 1, like a busy upgrade");
    drop(first);
    f.rel.lock().unwrap();
}

#[test]
fn pruning_keeps_the_newest_and_every_protected_release() {
    let f = Fixture::new();
    let lock = f.rel.lock().unwrap();
    for (i, name) in ["r1", "r2", "r3", "r4", "r5", "r6"].iter().enumerate() {
        std::fs::create_dir_all(f.rel.release(name)).unwrap();
        let mut meta = Meta::new(name, Path::new("a.tar.gz"));
        meta.deployed_unix_ms = 1000 + i as u64;
        f.rel.write_meta(&meta, &lock).unwrap();
    }
    // A leftover of a killed deploy.
    std::fs::create_dir_all(f.rel.releases_dir().join(".tmp-r7-abc/x")).unwrap();
    let removed = f
        .rel
        .prune(2, &["r1".to_owned(), "r3".to_owned()], &lock)
        .unwrap();
    assert_eq!(removed, vec!["r2", "r4"]);
    let left: Vec<_> = f.rel.list().unwrap().into_iter().map(|l| l.name).collect();
    assert_eq!(left, vec!["r6", "r5", "r3", "r1"]);
    assert!(f.rel.read_meta("r2").is_none());
    let names: Vec<_> = std::fs::read_dir(f.rel.releases_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}
