//! `baton deploy`, `baton releases` and `--json`: artifacts unpacked side
//! by side under a releases root, `current` repointed, upgrades under
//! load, bad artifacts refused without touching what runs or what is
//! deployed, a failed upgrade putting `current` back, pruning.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_e2e::*;

/// A release tree for the Rust example answering `version`; `server`
/// overrides its start script (a bad release).
fn release_tree(dir: &Path, version: &str, server: Option<&str>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("VERSION"), version).unwrap();
    let body = match server {
        Some(s) => s.to_owned(),
        None => format!("exec {} \"$@\"", bin("hello").display()),
    };
    write_script(&dir.join("bin/server"), &body);
}

fn tar_of(src: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", src).unwrap();
    b.into_inner().unwrap()
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A tar entry with a path or link the tar crate's builder would refuse.
fn hostile_tar(path: &str, kind: tar::EntryType, link: Option<&str>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
    if let Some(link) = link {
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    let data: &[u8] = if kind == tar::EntryType::Regular {
        b"x"
    } else {
        b""
    };
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, data).unwrap();
    // A good file after it: the refusal must stop everything.
    let mut h = tar::Header::new_gnu();
    h.set_path("VERSION").unwrap();
    h.set_size(3);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &b"bad"[..]).unwrap();
    b.into_inner().unwrap()
}

/// A releases root with v1 staged, and baton running in `current`.
struct Site {
    baton: Baton,
    arts: PathBuf,
    root: PathBuf,
}

impl Site {
    fn start(extra: &[&str]) -> Self {
        Self::start_in(None, extra)
    }

    /// [`Site::start`] with the releases root at `root` (default: `srv` in
    /// baton's temp dir).
    fn start_in(root: Option<&Path>, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let arts = dir.path().join("artifacts");
        let root = root.map_or_else(|| dir.path().join("srv"), Path::to_owned);
        std::fs::create_dir_all(&arts).unwrap();
        let control = dir.path().join("ctl/control.sock");
        let v1 = Self::make(&arts, "app-v1", None);
        // The first install: nothing runs yet, so no upgrade.
        let out = cli(
            &control,
            &[
                "deploy",
                "--no-upgrade",
                "--releases-dir",
                root.to_str().unwrap(),
                v1.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{}", describe_output(&out));
        let mut args = vec![
            "--listen",
            "http=127.0.0.1:0",
            "--releases-dir",
            root.to_str().unwrap(),
            "--drain-timeout",
            "10s",
            "--ready-timeout",
            "5s",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "./bin/server"]);
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let baton = Baton::spawn(dir, &args);
        baton.wait_active(1);
        Self { baton, arts, root }
    }

    /// Writes artifact `NAME.tar.gz` of a release answering `NAME`'s version.
    fn make(arts: &Path, name: &str, server: Option<&str>) -> PathBuf {
        let tree = arts.join(format!("{name}.tree"));
        let version = name.trim_start_matches("app-");
        release_tree(&tree, version, server);
        let path = arts.join(format!("{name}.tar.gz"));
        std::fs::write(&path, gz(&tar_of(&tree))).unwrap();
        path
    }

    fn artifact(&self, name: &str) -> PathBuf {
        Self::make(&self.arts, name, None)
    }

    fn write(&self, file: &str, bytes: &[u8]) -> PathBuf {
        let path = self.arts.join(file);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// `baton deploy --json ARGS`: asserts the exit code, returns the one
    /// JSON object it printed.
    fn deploy_json(&self, args: &[&str], code: i32) -> (serde_json::Value, CmdOutput) {
        let mut full = vec!["deploy", "--json"];
        full.extend_from_slice(args);
        self.json(&full, code)
    }

    fn json(&self, args: &[&str], code: i32) -> (serde_json::Value, CmdOutput) {
        let out = self.baton.cli(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "expected exit {code}\n{}\n--- baton log:\n{}",
            describe_output(&out),
            self.baton.stderr.text()
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(text.lines().count(), 1, "one JSON object:\n{text}");
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", describe_output(&out)));
        (v, out)
    }

    fn current(&self) -> PathBuf {
        std::fs::read_link(self.root.join("current")).unwrap()
    }

    /// Release directories (and any temporary ones), sorted.
    fn on_disk(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root.join("releases"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn releases(&self) -> Vec<serde_json::Value> {
        let out = self.baton.cli(&["releases", "--json"]);
        assert!(out.status.success(), "{}", describe_output(&out));
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
    }

    fn state_of(&self, name: &str) -> serde_json::Value {
        self.releases()
            .into_iter()
            .find(|r| r["name"] == name)
            .map(|r| r["state"].clone())
            .unwrap_or_else(|| panic!("no release {name}: {:?}", self.releases()))
    }

    fn serves(&self) -> String {
        version_of(&get(self.baton.addr("http"), "/").unwrap().body)
    }
}

/// `baton deploy` of good artifacts (.tar.gz, .tar.zst, a directory) under
/// continuous load in both connection modes: every deploy exits 0, the
/// new version answers right after, `current` and `releases` follow, and
/// no request fails.
#[test]
fn deploys_under_load_switch_versions_with_no_failed_request() {
    let site = Site::start(&[]);
    let addr = site.baton.addr("http");
    assert_eq!(site.serves(), "v1");
    let load = Load::start(
        addr,
        &[Mode::NewConnection, Mode::KeepAlive],
        2,
        Duration::from_secs(180),
    );
    let v2 = site.artifact("app-v2");
    let zst_tree = site.arts.join("zst.tree");
    release_tree(&zst_tree, "v3", None);
    let v3 = site.write(
        "app-v3.tar.zst",
        &zstd::encode_all(&tar_of(&zst_tree)[..], 3).unwrap(),
    );
    let v4 = site.arts.join("app-v4");
    release_tree(&v4, "v4", None);
    for (artifact, name, gen) in [(&v2, "app-v2", 2), (&v3, "app-v3", 3), (&v4, "app-v4", 4)] {
        let (v, _) = site.deploy_json(&[artifact.to_str().unwrap()], 0);
        assert_eq!(v["outcome"], "succeeded", "{v}");
        assert_eq!(v["command"], "deploy", "{v}");
        assert_eq!(v["release_name"], name, "{v}");
        assert_eq!(v["generation"], gen, "{v}");
        assert_eq!(v["active"], gen, "{v}");
        assert!(
            v["release"]
                .as_str()
                .unwrap()
                .ends_with(&format!("releases/{name}")),
            "{v}"
        );
        assert_eq!(v["current"], format!("releases/{name}"), "{v}");
        for phase in [
            "upgrade_requested",
            "spawned",
            "ready",
            "active",
            "upgrade_succeeded",
        ] {
            assert!(v["phases"][phase].is_number(), "no phase {phase}: {v}");
        }
        assert!(v["reason"].is_null(), "{v}");
        assert_eq!(site.serves(), name.trim_start_matches("app-"));
        assert_eq!(site.current(), Path::new("releases").join(name));
        load.wait_requests(20);
    }
    let report = load.finish();
    eprintln!(
        "3 deploys: {} requests ok, {} failed, {} keep-alive retries",
        report.ok, report.failed, report.retried
    );
    report.assert_no_failures();
    assert_eq!(site.state_of("app-v4"), "active");
    assert_eq!(site.state_of("app-v3"), "previous");
    // The human listing says the same.
    let out = site.baton.cli(&["releases"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("app-v4")).unwrap();
    assert!(line.contains("active") && line.ends_with('*'), "{text}");
}

/// Bad input is a one-line error naming the bad thing, exit 2, `--json`
/// says `refused`, and nothing is touched: no generation is requested,
/// `current` and the releases on disk are as before, v1 serves.
#[test]
fn bad_artifacts_are_refused_naming_the_problem_and_touch_nothing() {
    let site = Site::start(&[]);
    let addr = site.baton.addr("http");
    let load = Load::start(addr, &[Mode::NewConnection], 2, Duration::from_secs(120));
    let good = gz(&tar_of(&{
        let t = site.arts.join("good.tree");
        release_tree(&t, "v9", None);
        t
    }));
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "missing",
            site.arts.join("app-v9.tar.gz"),
            "app-v9.tar.gz: not found",
        ),
        (
            "truncated",
            site.write("cut.tar.gz", &good[..good.len() / 2]),
            "cut.tar.gz: corrupt archive",
        ),
        (
            "not an archive",
            site.write("notes.tar.gz", b"release notes, not a tarball"),
            "notes.tar.gz: not a .tar.gz",
        ),
        (
            "dot-dot",
            site.write(
                "up.tar.gz",
                &gz(&hostile_tar(
                    "../../etc/evil",
                    tar::EntryType::Regular,
                    None,
                )),
            ),
            "\"../../etc/evil\" has a `..` component",
        ),
        (
            "absolute",
            site.write(
                "abs.tar.gz",
                &gz(&hostile_tar("/etc/evil", tar::EntryType::Regular, None)),
            ),
            "\"/etc/evil\" is an absolute path",
        ),
        (
            "symlink out",
            site.write(
                "link.tar.gz",
                &gz(&hostile_tar(
                    "data",
                    tar::EntryType::Symlink,
                    Some("/var/lib"),
                )),
            ),
            "\"data\" is a symlink to an absolute path",
        ),
        (
            "hard link out",
            site.write(
                "hard.tar.gz",
                &gz(&hostile_tar(
                    "pw",
                    tar::EntryType::Link,
                    Some("../../etc/passwd"),
                )),
            ),
            "\"pw\" is a hard link whose target has a `..` component",
        ),
        (
            "device",
            site.write(
                "dev.tar.gz",
                &gz(&hostile_tar("null", tar::EntryType::Char, None)),
            ),
            "\"null\" is a device file",
        ),
        // A release of that name exists (v1 is serving from it).
        (
            "existing name",
            site.artifact("app-v1"),
            "release \"app-v1\" already exists",
        ),
    ];
    let disk_before = site.on_disk();
    let current_before = site.current();
    for (what, artifact, message) in &cases {
        let (v, out) = site.deploy_json(&[artifact.to_str().unwrap()], 2);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{what}: one line\n{stderr}"
        );
        assert!(
            stderr.contains(message),
            "{what}: {stderr:?} should say {message:?}"
        );
        assert_eq!(v["outcome"], "refused", "{what}: {v}");
        assert_eq!(v["exit_code"], 2, "{what}: {v}");
        assert!(
            v["reason"].as_str().unwrap().contains(message),
            "{what}: {v}"
        );
        assert_eq!(site.on_disk(), disk_before, "{what}: releases changed");
        assert_eq!(site.current(), current_before, "{what}: current moved");
    }
    // A bad name is refused the same way.
    let (_, out) = site.deploy_json(
        &["--name", "../x", site.artifact("app-v8").to_str().unwrap()],
        2,
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad release name \"../x\""));
    assert_eq!(site.on_disk(), disk_before);
    let s = site.baton.status();
    assert_eq!(s["active"], 1, "{s}");
    assert_eq!(
        s["generations"].as_array().unwrap().len(),
        1,
        "no generation requested: {s}"
    );
    assert_eq!(site.serves(), "v1");
    // Positive control: the same kind of artifact, well formed, deploys.
    let (v, _) = site.deploy_json(&[site.write("app-v9.tar.gz", &good).to_str().unwrap()], 0);
    assert_eq!(v["outcome"], "succeeded", "{v}");
    assert_eq!(site.serves(), "v9");
    load.finish().assert_no_failures();
}

/// A release whose upgrade fails: exit 1, `--json` says `failed` with the
/// reason and the candidate's stderr, `current` points back at the
/// release that still serves, and `releases` marks the new one failed.
/// No request fails meanwhile.
#[test]
fn a_failed_upgrade_puts_current_back() {
    let site = Site::start(&[]);
    let addr = site.baton.addr("http");
    let load = Load::start(
        addr,
        &[Mode::NewConnection, Mode::KeepAlive],
        2,
        Duration::from_secs(120),
    );
    let bad = Site::make(
        &site.arts,
        "app-v2",
        Some("echo 'v2: cannot open database' >&2; exit 3"),
    );
    let (v, out) = site.deploy_json(&[bad.to_str().unwrap()], 1);
    assert_eq!(v["outcome"], "failed", "{v}");
    assert_eq!(v["exit_code"], 1, "{v}");
    assert_eq!(v["generation"], 2, "{v}");
    assert_eq!(v["active"], 1, "{v}");
    assert!(
        v["reason"].as_str().unwrap().contains("exit status 3"),
        "{v}"
    );
    assert_eq!(v["stderr_tail"][0], "v2: cannot open database", "{v}");
    assert_eq!(v["current"], "releases/app-v1", "{v}");
    assert!(
        v["active_release"]
            .as_str()
            .unwrap()
            .ends_with("releases/app-v1"),
        "{v}"
    );
    assert!(out.stderr.is_empty(), "{}", describe_output(&out));
    assert_eq!(site.current(), Path::new("releases/app-v1"));
    assert_eq!(site.serves(), "v1");
    assert_eq!(site.state_of("app-v2"), "failed");
    assert_eq!(site.state_of("app-v1"), "active");
    // The human output says where `current` went.
    let bad3 = Site::make(&site.arts, "app-v3", Some("exit 4"));
    let out = site.baton.cli(&["deploy", bad3.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", describe_output(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("current -> releases/app-v1 again"));
    // A later upgrade (or SIGHUP) runs what `current` says: still v1.
    site.baton.upgrade_expect(&[], 0);
    assert_eq!(site.serves(), "v1");
    load.finish().assert_no_failures();
}

/// `keep_releases` prunes the oldest releases but never the active, the
/// previous (what `baton rollback` starts) or a running one: here a
/// canary leaves the old release active, beyond the count.
#[test]
fn pruning_never_removes_the_active_or_previous_release() {
    let site = Site::start(&["--keep-releases", "1"]);
    let (v, _) = site.deploy_json(&[site.artifact("app-v2").to_str().unwrap()], 0);
    assert_eq!(v["pruned"], serde_json::json!([]), "v1 is previous: {v}");
    let (v, _) = site.deploy_json(&[site.artifact("app-v3").to_str().unwrap()], 0);
    assert_eq!(v["pruned"], serde_json::json!(["app-v1"]), "{v}");
    assert_eq!(site.on_disk(), ["app-v2", "app-v3"]);
    // A canary: v4 is the newest, v3 still active, v2 previous.
    let (v, _) = site.deploy_json(
        &["--canary", "50", site.artifact("app-v4").to_str().unwrap()],
        0,
    );
    assert_eq!(v["canary"], 50, "{v}");
    assert_eq!(v["active"], 3, "{v}");
    assert_eq!(v["pruned"], serde_json::json!([]), "{v}");
    assert_eq!(site.on_disk(), ["app-v2", "app-v3", "app-v4"]);
    assert_eq!(site.state_of("app-v3"), "active");
    assert_eq!(site.state_of("app-v4"), "candidate");
    assert_eq!(site.state_of("app-v2"), "previous");
    // Aborting the canary puts `current` back on v3, and v4 is failed.
    let (v, _) = site.json(&["rollback", "--json"], 0);
    assert_eq!(v["current"], "releases/app-v3", "{v}");
    assert_eq!(site.current(), Path::new("releases/app-v3"));
    assert_eq!(site.state_of("app-v4"), "failed");
    // A cold rollback goes to v2, and `current` follows it.
    let (v, _) = site.json(&["rollback", "--json"], 0);
    assert_eq!(v["outcome"], "succeeded", "{v}");
    assert_eq!(v["release_name"], "app-v2", "{v}");
    assert_eq!(site.current(), Path::new("releases/app-v2"));
    assert_eq!(site.serves(), "v2");
}

/// `--json` on `upgrade`: one object, also when refused; `--events` keeps
/// the raw event stream.
#[test]
fn upgrade_json_is_one_object_and_events_keep_the_stream() {
    let site = Site::start(&[]);
    let (v, _) = site.json(&["upgrade", "--json"], 0);
    assert_eq!(
        (v["command"].as_str(), v["outcome"].as_str()),
        (Some("upgrade"), Some("succeeded"))
    );
    assert_eq!(v["generation"], 2, "{v}");
    assert!(
        v["phases"]["ready"].as_f64().unwrap() <= v["elapsed_ms"].as_f64().unwrap(),
        "{v}"
    );
    assert!(
        v["phases"]["exited:1"].is_number(),
        "the old generation drained: {v}"
    );
    let out = site.baton.cli(&["upgrade", "--events"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() > 3, "{lines:?}");
    assert!(lines.iter().any(|l| l["event"] == "ready"), "{lines:?}");
    assert_eq!(lines.last().unwrap()["type"], "done", "{lines:?}");
    // Unreachable: refused, exit 2, still one object.
    let nowhere = site.baton.path("nowhere.sock");
    let out = cli(&nowhere, &["upgrade", "--json"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe_output(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"], "refused", "{v}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("cannot reach the supervisor"),
        "{v}"
    );
}

/// A small tmpfs, unmounted (lazily: an app may still have its cwd there)
/// and its mount point removed when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = run(std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path()));
        assert!(out.status.success(), "{}", describe_output(&out));
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Bytes that do not compress (xorshift), so an artifact unpacks to its
/// full size.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A disk that fills up while unpacking: exit 1 naming the file and the
/// error, the temporary directory is gone (the space is free again),
/// `current` and the releases are as before, v1 serves.
#[test]
#[cfg_attr(not(baton_root), ignore = "needs root (mounts a small tmpfs)")]
fn a_full_disk_fails_the_deploy_and_touches_nothing() {
    assert_root();
    let disk = Tmpfs::mount("1m");
    let root = disk.path().join("srv");
    let site = Site::start_in(Some(&root), &[]);
    let free_before = nix::sys::statvfs::statvfs(disk.path())
        .unwrap()
        .blocks_available();
    let tree = site.arts.join("big.tree");
    release_tree(&tree, "v2", None);
    std::fs::write(tree.join("blob"), noise(3 << 20)).unwrap();
    let big = site.write("app-v2.tar.gz", &gz(&tar_of(&tree)));
    let disk_before = site.on_disk();
    let (v, out) = site.deploy_json(&[big.to_str().unwrap()], 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("blob") && stderr.contains("No space left on device"),
        "{stderr}"
    );
    assert_eq!(v["outcome"], "refused", "nothing was deployed: {v}");
    assert_eq!(site.on_disk(), disk_before);
    assert_eq!(site.current(), Path::new("releases/app-v1"));
    assert_eq!(
        nix::sys::statvfs::statvfs(disk.path())
            .unwrap()
            .blocks_available(),
        free_before,
        "the partial release was not removed"
    );
    assert_eq!(site.serves(), "v1");
    // Positive control: a release that fits deploys.
    let (v, _) = site.deploy_json(&[site.artifact("app-v3").to_str().unwrap()], 0);
    assert_eq!(v["outcome"], "succeeded", "{v}");
    assert_eq!(site.serves(), "v3");
}

/// `baton deploy` with `--workers 2`, under load: every worker of the new
/// generation runs the new release (each its own process, in the
/// release's directory), the old ones are gone, `--json` reports the
/// phases, and no request fails.
#[test]
fn a_deploy_replaces_every_worker_with_the_new_release() {
    let site = Site::start(&["--workers", "2"]);
    let addr = site.baton.addr("http");
    let workers = |gen: u64| -> Vec<i64> {
        let g = site.baton.generation(gen);
        g["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                assert_eq!(w["state"], "ready", "{g}");
                w["pid"].as_i64().unwrap()
            })
            .collect()
    };
    let old = workers(1);
    assert_eq!(old.len(), 2);
    let load = Load::start(
        addr,
        &[Mode::NewConnection, Mode::KeepAlive],
        2,
        Duration::from_secs(120),
    );
    let v2 = site.artifact("app-v2");
    let (v, _) = site.deploy_json(&[v2.to_str().unwrap()], 0);
    assert_eq!(v["outcome"], "succeeded", "{v}");
    assert_eq!(v["active"], 2, "{v}");
    assert!(v["phases"]["spawned"].is_number(), "{v}");
    let new = workers(2);
    assert_eq!(new.len(), 2);
    for pid in &new {
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
        assert!(
            cwd.ends_with("releases/app-v2"),
            "worker {pid} runs in {cwd:?}"
        );
    }
    site.baton.wait_until("the old workers to exit", WAIT, || {
        old.iter().all(|p| group_members(*p as i32).is_empty())
    });
    assert_eq!(site.serves(), "v2");
    load.wait_requests(20);
    load.finish().assert_no_failures();
}
