//! Reading a process's memory and CPU from /proc, to show what the
//! supervisor itself costs: RSS from `/proc/PID/status` (VmRSS), CPU from
//! `/proc/PID/stat` (utime + stime, all threads, in clock ticks), and the
//! exact on-CPU nanoseconds from every thread's `schedstat` where the
//! kernel has it (ticks are 10 ms, too coarse to tell "idle" from "almost").

use serde::Serialize;

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Sample {
    /// µs since the run's start (or 0 for a one-off reading).
    pub t_us: u64,
    pub rss_kb: u64,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    /// Sum of the threads' on-CPU time in ns, if schedstat is available.
    pub cpu_ns: Option<u64>,
    /// Open file descriptors (entries of /proc/PID/fd), if readable.
    pub fds: Option<u64>,
}

/// Clock ticks per second for /proc times.
pub fn clock_ticks() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(n)) if n > 0 => n as u64,
        _ => 100, // USER_HZ on every mainstream Linux
    }
}

/// `VmRSS:    1234 kB` → 1234.
pub fn parse_rss_kb(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// utime + stime from a `/proc/PID/stat` line. The command name (field 2)
/// is in parentheses and may contain spaces, so fields are counted from
/// the last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')': state(3) ppid(4) ... utime is field 14, stime 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// utime + stime + cutime + cstime: the process and the children it has
/// reaped (a supervisor reaps its generations, so their CPU lands here).
pub fn parse_cpu_ticks_with_reaped(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let v: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    (v.len() == 4).then(|| v.iter().sum())
}

fn tree_ticks_of(pid: i32, depth: u32) -> Option<u64> {
    let own =
        parse_cpu_ticks_with_reaped(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let kids: u64 = if depth == 0 {
        0
    } else {
        children(pid)
            .into_iter()
            .filter_map(|c| tree_ticks_of(c, depth - 1))
            .sum()
    };
    Some(own + kids)
}

/// CPU ticks of a process tree: the process, its live children and
/// grandchildren, and everything they reaped.
pub fn tree_ticks(pid: i32) -> Option<u64> {
    tree_ticks_of(pid, 2)
}

/// The first number of a `schedstat` line: ns spent on the CPU.
pub fn parse_schedstat_ns(s: &str) -> Option<u64> {
    s.split_whitespace().next()?.parse().ok()
}

fn schedstat_ns(pid: i32) -> Option<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = entry.ok()?.path().join("schedstat");
        total += parse_schedstat_ns(&std::fs::read_to_string(path).ok()?)?;
    }
    Some(total)
}

/// Reads a process now; `None` if it is gone.
pub fn sample(pid: i32, t_us: u64) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(Sample {
        t_us,
        rss_kb: parse_rss_kb(&status)?,
        cpu_ticks: parse_cpu_ticks(&stat)?,
        cpu_ns: schedstat_ns(pid),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()
            .map(|d| d.count() as u64),
    })
}

/// Busy and total jiffies of all CPUs, from the first line of /proc/stat
/// (`cpu  user nice system idle iowait irq softirq steal ...`).
pub fn parse_cpu_line(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|n| n.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4]; // idle + iowait
    Some((total - idle, total))
}

/// The machine's busy and total jiffies now.
pub fn machine_cpu() -> Option<(u64, u64)> {
    parse_cpu_line(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Share of all CPUs that was busy between two readings, in %.
pub fn busy_percent(a: (u64, u64), b: (u64, u64)) -> Option<f64> {
    let total = b.1.checked_sub(a.1)?;
    (total > 0).then(|| 100.0 * b.0.saturating_sub(a.0) as f64 / total as f64)
}

/// Direct children of a process (its main thread's), from
/// `/proc/PID/task/PID/children`.
pub fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// CPU used between two samples, as a percentage of one core.
pub fn cpu_percent(a: &Sample, b: &Sample, ticks_per_s: u64) -> Option<f64> {
    let secs = (b.t_us.checked_sub(a.t_us)?) as f64 / 1e6;
    if secs <= 0.0 {
        return None;
    }
    let used = match (a.cpu_ns, b.cpu_ns) {
        (Some(x), Some(y)) if y >= x => (y - x) as f64 / 1e9,
        _ => b.cpu_ticks.checked_sub(a.cpu_ticks)? as f64 / ticks_per_s as f64,
    };
    Some(100.0 * used / secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reaped_children_count_in_the_tree() {
        let s =
            "4242 (baton) S 1 4242 4242 0 -1 4194560 500 0 0 0 17 5 100 30 20 0 3 0 100 1000 200";
        assert_eq!(parse_cpu_ticks_with_reaped(s), Some(152));
        assert!(tree_ticks(std::process::id() as i32).is_some());
    }

    #[test]
    fn rss_from_status() {
        let s = "Name:\tbaton\nVmPeak:\t  20000 kB\nVmRSS:\t    5120 kB\nThreads:\t3\n";
        assert_eq!(parse_rss_kb(s), Some(5120));
        assert_eq!(parse_rss_kb("Name:\tx\n"), None);
    }

    #[test]
    fn ticks_from_stat_with_spaces_in_name() {
        let s = "4242 (my (weird) app) S 1 4242 4242 0 -1 4194560 500 0 0 0 17 5 0 0 20 0 3 0 100 1000 200";
        assert_eq!(parse_cpu_ticks(s), Some(22));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn machine_busy_from_proc_stat() {
        let a = parse_cpu_line("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n").expect("parses");
        assert_eq!(a, (150, 1000));
        let b = (a.0 + 30, a.1 + 100);
        assert_eq!(busy_percent(a, b), Some(30.0));
        assert!(machine_cpu().is_some());
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id() as i32;
        let s = sample(me, 0).expect("own /proc entry");
        assert!(s.rss_kb > 0);
        assert!(s.fds.is_some_and(|n| n >= 3), "{s:?}");
        assert_eq!(parse_schedstat_ns("123 456 7\n"), Some(123));
    }

    #[test]
    fn cpu_percent_prefers_nanoseconds() {
        let a = Sample {
            t_us: 0,
            rss_kb: 1,
            cpu_ticks: 10,
            cpu_ns: Some(1_000_000),
            fds: None,
        };
        let b = Sample {
            t_us: 2_000_000,
            rss_kb: 1,
            cpu_ticks: 12,
            cpu_ns: Some(21_000_000),
            fds: None,
        };
        let p = cpu_percent(&a, &b, 100).expect("percent");
        assert!((p - 1.0).abs() < 1e-9, "{p}");
        let (a2, b2) = (Sample { cpu_ns: None, ..a }, Sample { cpu_ns: None, ..b });
        let p = cpu_percent(&a2, &b2, 100).expect("percent");
        assert!((p - 1.0).abs() < 1e-9, "{p}");
    }
}
