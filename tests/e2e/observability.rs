//! Metrics, JSON logs, shell completions and the man page, on the real
//! binary. A test learns an OS-chosen metrics port from baton's log line
//! `metrics listening address=IP:PORT` (the port is bound before that line
//! is written, so there is no window for another process to take it).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use baton_e2e::*;

// ----- the exposition format, parsed strictly --------------------------------------

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One scrape, every line checked: `# HELP|TYPE|UNIT name …` for a
/// `baton_` family, samples of a declared family (`name{k="v",…} value`,
/// names starting `baton_`), and `# EOF` last.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    fn parse(text: &str) -> Result<Self, String> {
        let mut samples = Vec::new();
        let mut families: Vec<(String, String)> = Vec::new();
        let lines: Vec<&str> = text.lines().collect();
        if lines.last() != Some(&"# EOF") || !text.ends_with('\n') {
            return Err("the exposition does not end with `# EOF`".into());
        }
        for (i, line) in lines.iter().enumerate() {
            let bad = |why: &str| format!("line {}: {why}: {line:?}", i + 1);
            if *line == "# EOF" {
                if i + 1 != lines.len() {
                    return Err(bad("`# EOF` before the end"));
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut words = rest.splitn(3, ' ');
                let (kind, name, arg) = (words.next(), words.next(), words.next());
                let name = name.ok_or_else(|| bad("a comment without a name"))?;
                if !valid_name(name) || !name.starts_with("baton_") {
                    return Err(bad("a family name that is not baton_…"));
                }
                match (kind, arg) {
                    (Some("HELP"), Some(help)) if !help.is_empty() => {}
                    (Some("TYPE"), Some(t))
                        if ["counter", "gauge", "histogram", "info", "summary"].contains(&t) =>
                    {
                        if families.iter().any(|(n, _)| n == name) {
                            return Err(bad("a family declared twice"));
                        }
                        families.push((name.to_owned(), t.to_owned()));
                    }
                    (Some("UNIT"), Some(u)) if name.ends_with(&format!("_{u}")) => {}
                    _ => return Err(bad("not a HELP, TYPE, UNIT or EOF comment")),
                }
                continue;
            }
            let sample = parse_sample(line).map_err(|e| bad(&e))?;
            let (family, kind) = families
                .last()
                .ok_or_else(|| bad("a sample before any TYPE"))?;
            let suffixes: &[&str] = match kind.as_str() {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                "info" => &["_info"],
                _ => &[""],
            };
            let belongs = suffixes
                .iter()
                .any(|s| sample.name == format!("{family}{s}"));
            if !belongs {
                return Err(bad(&format!("a sample outside its family {family}")));
            }
            samples.push(sample);
        }
        Ok(Self {
            text: text.to_owned(),
            samples,
        })
    }

    /// The sample with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{}", self.text))
    }

    /// The samples of `name` whose labels include `labels`.
    fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// How many observations a cutover phase has.
    fn phase_count(&self, phase: &str) -> f64 {
        self.get("baton_phase_duration_seconds_count", &[("phase", phase)])
            .unwrap_or(0.0)
    }

    fn upgrades(&self, outcome: &str) -> f64 {
        self.value("baton_upgrades_total", &[("outcome", outcome)])
    }

    /// The labels of generation `n`'s info series (exactly one).
    fn generation(&self, n: u64) -> BTreeMap<String, String> {
        let n = n.to_string();
        let found = self.matching("baton_generation_info", &[("generation", &n)]);
        assert_eq!(
            found.len(),
            1,
            "one info series for generation {n}:\n{}",
            self.text
        );
        assert_eq!(found[0].value, 1.0);
        found[0].labels.clone()
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `name{k="v",…} value` (label values with `\"`, `\\`, `\n` escapes).
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample without a value")?;
    let name = &line[..name_end];
    if !valid_name(name) || !name.starts_with("baton_") {
        return Err(format!("bad sample name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            let eq = inner.find('=').ok_or("a label without `=`")?;
            let key = &inner[..eq];
            if !valid_name(key) || key.contains(':') {
                return Err(format!("bad label name {key:?}"));
            }
            let mut chars = inner[eq + 1..].char_indices();
            if chars.next().map(|c| c.1) != Some('"') {
                return Err("an unquoted label value".into());
            }
            let mut value = String::new();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '"')) => value.push('"'),
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, 'n')) => value.push('\n'),
                        _ => return Err("a bad escape in a label value".into()),
                    },
                    Some((i, '"')) => break eq + 1 + i + 1,
                    Some((_, c)) => value.push(c),
                    None => return Err("an unterminated label value".into()),
                }
            };
            if labels.insert(key.to_owned(), value).is_some() {
                return Err(format!("label {key} twice"));
            }
            inner = &inner[end..];
            if let Some(more) = inner.strip_prefix(',') {
                inner = more;
            } else if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            } else {
                return Err("labels not closed by `}`".into());
            }
        }
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

// ----- talking to the endpoint -------------------------------------------------------

/// The metrics address baton logged.
fn metrics_addr(baton: &Baton) -> SocketAddr {
    baton.stderr.wait_for(&["metrics listening"], 1, WAIT);
    let line = baton
        .stderr
        .all()
        .into_iter()
        .find(|l| l.contains("metrics listening"))
        .unwrap();
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("address="))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}

/// `GET path`: status, headers (lowercased), body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: baton\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response {raw:?}"));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn scrape(addr: SocketAddr) -> Scrape {
    let (status, head, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    Scrape::parse(&body).unwrap_or_else(|e| panic!("{e}\n--- exposition:\n{body}"))
}

fn pid_of(baton: &Baton, gen: u64) -> String {
    baton.generation(gen)["pid"].as_i64().unwrap().to_string()
}

// ----- the tests ---------------------------------------------------------------------

/// Counters, histograms and generation info move with each upgrade, failed
/// upgrade, rollback and restart, and are already there when the command
/// that caused them returns: baton updates them before it sends the event
/// or reply, so no scrape here waits or retries.
#[test]
fn metrics_follow_upgrades_failures_and_rollbacks() {
    let baton = Baton::with_config(&fake_config("", ""), &["--metrics", "127.0.0.1:0"]);
    baton.wait_active(1);
    let addr = metrics_addr(&baton);
    let release = baton.generation(1)["dir"].as_str().unwrap().to_owned();

    // Only /metrics is served.
    let (status, _, _) = http_get(addr, "/");
    assert_eq!(status, 404);
    let s = scrape(addr);
    for outcome in ["succeeded", "failed", "rolled_back", "refused"] {
        assert_eq!(s.upgrades(outcome), 0.0, "{outcome} exists from the start");
    }
    let g1 = s.generation(1);
    assert_eq!(
        (
            g1["release"].as_str(),
            g1["phase"].as_str(),
            g1["role"].as_str()
        ),
        (release.as_str(), "active", "active")
    );
    assert_eq!(s.value("baton_active_generation", &[]), 1.0);
    assert_eq!(s.phase_count("spawned_to_ready"), 1.0);
    let pid1 = pid_of(&baton, 1);
    let rss = s.value(
        "baton_process_resident_memory_bytes",
        &[("generation", "1"), ("worker", "0"), ("pid", &pid1)],
    );
    assert!(rss > 100_000.0, "the app's RSS: {rss}");
    assert_eq!(
        s.value(
            "baton_generation_workers",
            &[("generation", "1"), ("state", "ready")]
        ),
        1.0
    );
    assert!(s.value("baton_supervisor_resident_memory_bytes", &[]) > 100_000.0);
    assert!(s.value("baton_supervisor_open_fds", &[]) >= 3.0);

    // Nothing to roll back to: refused.
    let out = baton.cli(&["rollback"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe_output(&out));
    let s = scrape(addr);
    assert_eq!(s.upgrades("refused"), 1.0);
    assert_eq!(
        s.value(
            "baton_refusals_total",
            &[("request", "rollback"), ("reason", "no_previous")]
        ),
        1.0
    );

    // An upgrade: every phase of the cutover is timed once, the old
    // generation drained (the command waits for its exit).
    baton.upgrade_expect(&[], 0);
    let s = scrape(addr);
    assert_eq!(s.upgrades("succeeded"), 1.0);
    assert_eq!(
        s.value(
            "baton_upgrade_duration_seconds_count",
            &[("outcome", "succeeded")]
        ),
        1.0
    );
    for (phase, n) in [
        ("requested_to_spawned", 1.0),
        ("spawned_to_ready", 2.0),
        ("ready_to_active", 1.0),
        ("requested_to_active", 1.0),
        ("retiring_to_draining", 1.0),
        ("draining_to_exited", 1.0),
    ] {
        assert_eq!(s.phase_count(phase), n, "{phase}:\n{}", s.text);
    }
    assert_eq!(s.generation(2)["phase"], "active");
    assert_eq!(
        (
            s.generation(1)["phase"].as_str(),
            s.generation(1)["role"].as_str()
        ),
        ("exited", "none")
    );
    assert_eq!(s.value("baton_active_generation", &[]), 2.0);
    assert_eq!(
        s.value("baton_exits_total", &[("how", "code"), ("status", "0")]),
        1.0
    );
    assert!(s
        .matching(
            "baton_process_resident_memory_bytes",
            &[("generation", "1")]
        )
        .is_empty());

    // A candidate that exits at once.
    baton.reconfigure(&fake_config("", "FAKE_EXIT_AT_START = \"7\""));
    baton.upgrade_expect(&[], 1);
    let s = scrape(addr);
    assert_eq!((s.upgrades("failed"), s.upgrades("succeeded")), (1.0, 1.0));
    assert_eq!(
        s.value("baton_upgrade_failures_total", &[("reason", "exited")]),
        1.0
    );
    assert_eq!(
        s.value("baton_exits_total", &[("how", "code"), ("status", "7")]),
        1.0
    );
    assert_eq!(s.generation(3)["phase"], "failed");

    // A bake, then a manual rollback to the parked generation.
    baton.reconfigure(&fake_config("", ""));
    baton.upgrade_expect(&["--bake", "60s", "--no-wait"], 0);
    let s = scrape(addr);
    assert_eq!(
        (
            s.generation(2)["role"].as_str(),
            s.generation(4)["role"].as_str()
        ),
        ("parked", "active")
    );
    let share =
        |s: &Scrape, g: &str| s.value("baton_generation_traffic_share_ratio", &[("generation", g)]);
    assert_eq!((share(&s, "2"), share(&s, "4")), (0.0, 1.0));
    assert_eq!(s.value("baton_upgrade_in_progress", &[]), 1.0);
    let out = baton.cli(&["rollback", "--no-wait-drain"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    let s = scrape(addr);
    let rollbacks = |s: &Scrape, trigger: &str| {
        s.value(
            "baton_rollbacks_total",
            &[("trigger", trigger), ("kind", "instant")],
        )
    };
    assert_eq!(
        (rollbacks(&s, "manual"), rollbacks(&s, "automatic")),
        (1.0, 0.0)
    );
    assert_eq!(s.upgrades("rolled_back"), 1.0);
    assert_eq!(s.value("baton_active_generation", &[]), 2.0);
    assert_eq!(s.value("baton_upgrade_in_progress", &[]), 0.0);

    // The new generation crashes during its bake: rolled back by itself.
    baton.reconfigure(&fake_config("", "FAKE_CRASH_AFTER_READY_MS = \"300\""));
    baton.upgrade_expect(&["--bake", "60s"], 1);
    let s = scrape(addr);
    assert_eq!(
        (rollbacks(&s, "manual"), rollbacks(&s, "automatic")),
        (1.0, 1.0)
    );
    assert_eq!(s.upgrades("rolled_back"), 2.0);
    assert_eq!(
        s.value("baton_upgrade_failures_total", &[("reason", "died")]),
        1.0
    );
    assert_eq!(
        s.value("baton_exits_total", &[("how", "code"), ("status", "3")]),
        1.0
    );
    assert_eq!(s.value("baton_restarts_total", &[]), 0.0);

    // The active generation killed: restarted, and the log line saying so
    // comes after the metrics were updated.
    let pid2 = pid_of(&baton, 2);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid2.parse().unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    baton
        .stderr
        .wait_for(&["restarting generation", "generation=2 "], 1, WAIT);
    let s = scrape(addr);
    assert_eq!(s.value("baton_restarts_total", &[]), 1.0);
    assert_eq!(
        s.value(
            "baton_exits_total",
            &[("how", "signal"), ("status", "SIGKILL")]
        ),
        1.0
    );
    assert_eq!(
        s.value("baton_generation_restarts", &[("generation", "2")]),
        1.0
    );
    assert!(s
        .get(
            "baton_generation_last_exit_info",
            &[
                ("generation", "2"),
                ("how", "signal"),
                ("status", "SIGKILL")
            ]
        )
        .is_some());
    assert_eq!(s.upgrades("succeeded"), 1.0, "still one success");
}

/// `--metrics` that is not an address, or one that cannot be bound, is a
/// usage error: exit 2 with one line naming it, nothing started, and the
/// holder of a busy address undisturbed.
#[test]
fn a_bad_or_busy_metrics_address_is_a_usage_error_and_starts_nothing() {
    let fake = bin("test-socketfd").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let run_baton = |args: &[&str]| {
        let mut cmd = Command::new(bin("baton"));
        cmd.arg("--control")
            .arg(&control)
            .arg("run")
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null());
        run(&mut cmd)
    };
    let first_line = |out: &CmdOutput| {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    };

    let out = run_baton(&[
        "--metrics",
        "nowhere",
        "--listen",
        "http=127.0.0.1:0",
        "--",
        &fake,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", describe_output(&out));
    let line = first_line(&out);
    assert!(
        line.contains("--metrics") && line.contains("nowhere"),
        "{line}"
    );

    std::fs::write(
        dir.path().join("baton.toml"),
        format!("command = [\"{fake}\"]\nmetrics = \"nowhere:9100\"\n"),
    )
    .unwrap();
    let out = run_baton(&["--config", "baton.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe_output(&out));
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert!(!stderr.contains('\n'), "one line: {stderr}");
    assert!(
        stderr.contains("line 2") && stderr.contains("nowhere:9100"),
        "{stderr}"
    );

    // Busy: another process holds the address.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = holder.local_addr().unwrap().to_string();
    let mut baton = Baton::spawn(
        tempfile::tempdir().unwrap(),
        &[
            "--metrics",
            &busy,
            "--listen",
            "http=127.0.0.1:0",
            "--",
            &fake,
        ],
    );
    assert_eq!(baton.wait_exit(WAIT), 2, "{}", baton.logs());
    let errors: Vec<String> = baton
        .stderr
        .all()
        .into_iter()
        .filter(|l| l.contains("error"))
        .collect();
    assert!(
        errors.len() == 1 && errors[0].contains(&busy) && errors[0].contains("metrics"),
        "{errors:?}"
    );
    assert_eq!(
        baton.stderr.count(&["generation started"]),
        0,
        "{}",
        baton.logs()
    );
    assert!(!baton.control.exists(), "no control socket was created");
    let client = TcpStream::connect(&busy).unwrap();
    let (accepted, _) = holder.accept().unwrap();
    assert_eq!(accepted.peer_addr().unwrap(), client.local_addr().unwrap());

    // Positive control: with a free address the same command runs.
    let baton = Baton::start(&[
        "--metrics",
        "127.0.0.1:0",
        "--listen",
        "http=127.0.0.1:0",
        "--",
        &fake,
    ]);
    assert_eq!(baton.stderr.count(&["generation started"]), 1);
    assert_eq!(
        scrape(metrics_addr(&baton)).value("baton_active_generation", &[]),
        1.0
    );
}

/// `--log-format json` (here from the file): every line baton writes on
/// stderr, the app's stderr lines included, is one JSON object with
/// `timestamp`, `level` and `message`, and the events' fields as values.
#[test]
fn json_logs_are_one_object_per_line() {
    let config = fake_config("log_format = \"json\"", "FAKE_STDERR_LINES = \"2\"");
    let mut baton = Baton::with_config(&config, &[]);
    let active = |n: u64| format!("\"generation\":{n},");
    baton
        .stderr
        .wait_for(&["\"message\":\"generation active\"", &active(1)], 1, WAIT);
    let out = baton.cli(&["upgrade"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    baton
        .stderr
        .wait_for(&["\"message\":\"generation active\"", &active(2)], 1, WAIT);
    let out = baton.cli(&["stop"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(baton.wait_exit(WAIT), 0);

    let lines = baton.stderr.all();
    let objects: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\n{}", baton.logs()));
            assert!(v.is_object(), "{l}");
            let ts = v["timestamp"].as_str().unwrap_or("");
            assert!(ts.len() >= 20 && ts.ends_with('Z'), "timestamp in {l}");
            assert!(v["level"].is_string() && v["message"].is_string(), "{l}");
            v
        })
        .collect();
    let active2 = objects
        .iter()
        .find(|v| v["message"] == "generation active" && v["generation"] == 2)
        .expect("generation 2's activation");
    assert!(active2["pid"].is_i64(), "{active2}");
    let app: Vec<&serde_json::Value> = objects.iter().filter(|v| v["source"] == "app").collect();
    let line1 = app
        .iter()
        .filter(|v| v["message"] == "fake: stderr line 1")
        .count();
    assert_eq!(line1, 2, "the app's stderr, once per generation: {app:?}");
    assert!(app.iter().all(|v| v["pid"].is_i64()));
    assert!(objects
        .iter()
        .any(|v| v["message"] == "all generations exited; supervisor done"));

    // Positive control: the same file with `--log-format text` (flags
    // win) writes lines that are not JSON.
    let text = Baton::with_config(&config, &["--log-format", "text"]);
    text.wait_active(1);
    text.stderr.wait_for(&["fake: stderr line 2"], 1, WAIT);
    assert!(text
        .stderr
        .all()
        .iter()
        .all(|l| serde_json::from_str::<serde_json::Value>(l).is_err()));
}

/// The completion scripts and the man page come from the clap definitions:
/// each names every subcommand and run's new flags; bash loads its script.
#[test]
fn completions_and_man_page_name_every_subcommand() {
    let baton = bin("baton");
    // Fish names long options without their dashes (`-l metrics`).
    let words = [
        "run",
        "upgrade",
        "rollback",
        "promote",
        "status",
        "stop",
        "metrics",
        "log-format",
    ];
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run(Command::new(&baton).args(["completions", shell]));
        assert!(out.status.success(), "{}", describe_output(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        for w in words {
            assert!(
                script.contains(w),
                "{shell}: no {w}:\n{}",
                describe_output(&out)
            );
        }
    }
    let out = run(Command::new("bash").arg("-c").arg(format!(
        "source <(\"{}\" completions bash) && complete -p baton",
        baton.display()
    )));
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("_baton"));
    // Positive control: a shell it does not know is a usage error.
    let out = run(Command::new(&baton).args(["completions", "tcsh"]));
    assert_eq!(out.status.code(), Some(2), "{}", describe_output(&out));

    let out = run(Command::new(&baton).arg("man"));
    assert!(out.status.success(), "{}", describe_output(&out));
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains("\n.TH baton 1 "), "{}", describe_output(&out));
    for sub in [
        "RUN",
        "UPGRADE",
        "ROLLBACK",
        "PROMOTE",
        "STATUS",
        "STOP",
        "COMPLETIONS",
    ] {
        assert!(
            page.contains(&format!(".SH \"BATON {sub}\"")),
            "no {sub} section"
        );
    }
    assert!(page.contains("\\-\\-metrics") && page.contains("\\-\\-log\\-format"));
}

// ----- idle ----------------------------------------------------------------------

/// Context switches of every thread of `pid`: (per thread id, total).
fn switches(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let n: u64 = status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        out.insert(t.file_name().to_string_lossy().into_owned(), n);
    }
    out
}

/// How often `pid`'s threads were switched to or from while `during` ran:
/// a thread that ended meanwhile counts as one.
fn wakeups_during(pid: u32, during: impl FnOnce()) -> u64 {
    let before = switches(pid);
    during();
    let after = switches(pid);
    before
        .iter()
        .map(|(tid, n)| after.get(tid).map_or(1, |m| m.saturating_sub(*n)))
        .sum::<u64>()
        + after.keys().filter(|t| !before.contains_key(*t)).count() as u64
}

/// With nothing happening, baton does not wake up: it polls nothing (an
/// app's `shutdown()` of a listener wakes it through the socket's hang-up,
/// not a timer). Positive control: one `baton status` shows up in the
/// same count.
#[test]
fn an_idle_baton_does_not_wake_up() {
    for traffic in ["steered", "shared"] {
        let baton = Baton::with_config(&fake_config(&format!("traffic = \"{traffic}\""), ""), &[]);
        baton.wait_active(1);
        // Settled: the start's stragglers (log lines, the status poll that
        // saw it active) are done.
        std::thread::sleep(Duration::from_millis(300));
        let idle = wakeups_during(baton.pid(), || std::thread::sleep(Duration::from_secs(2)));
        let busy = wakeups_during(baton.pid(), || {
            assert!(baton.cli(&["status"]).status.success());
        });
        assert!(busy > 0, "{traffic}: a status request was not counted");
        assert!(
            idle <= 2,
            "{traffic}: baton woke {idle} times in 2 s with nothing to do (polling the sockets every 100 ms shows about 40)\n{}",
            baton.logs()
        );
    }
}
