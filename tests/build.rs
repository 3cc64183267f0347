//! Sets `cfg(baton_root)` when the tests are built by root (effective uid
//! 0), so the tests that need root are compiled as ignored otherwise and
//! show as ignored, never as passed. Those tests also check at run time
//! that they really run as root.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(baton_root)");
    println!("cargo::rerun-if-changed=build.rs");
    // The euid is the second field of the `Uid:` line.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse::<u32>().ok());
    if euid == Some(0) {
        println!("cargo::rustc-cfg=baton_root");
    }
}
