//! The sd_notify messages an app may send on `NOTIFY_SOCKET`.
//!
//! A datagram holds newline-separated `KEY=VALUE` assignments. Which
//! generation it counts for is decided by the kernel-verified sender, never
//! by anything in the payload.

/// The largest datagram read whole, as systemd's own limit: anything
/// longer is dropped rather than parsed truncated.
pub const MAX_DATAGRAM: usize = 4096;

/// One state change an app reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyMessage {
    Ready,
    Stopping,
    Reloading,
    Status(String),
    /// `MAINPID=`: accepted only from the generation's own process group.
    MainPid(i32),
}

/// Parses one datagram: newline-separated `KEY=VALUE` assignments. Unknown
/// keys (WATCHDOG=, ERRNO=, FDSTORE=, …) are ignored, as systemd does with
/// keys it does not act on. Invalid UTF-8 is replaced rather than dropped.
pub fn parse(datagram: &[u8]) -> Vec<NotifyMessage> {
    let text = String::from_utf8_lossy(datagram);
    text.split('\n')
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            match key {
                "READY" if value == "1" => Some(NotifyMessage::Ready),
                "STOPPING" if value == "1" => Some(NotifyMessage::Stopping),
                "RELOADING" if value == "1" => Some(NotifyMessage::Reloading),
                "STATUS" => Some(NotifyMessage::Status(truncate(value, 512))),
                "MAINPID" => value
                    .parse()
                    .ok()
                    .filter(|p| *p > 0)
                    .map(NotifyMessage::MainPid),
                _ => None,
            }
        })
        .collect()
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_assignments() {
        assert_eq!(
            parse(b"READY=1\nSTATUS=warming up\nWATCHDOG=1\n"),
            vec![
                NotifyMessage::Ready,
                NotifyMessage::Status("warming up".into())
            ]
        );
        assert_eq!(parse(b"STOPPING=1"), vec![NotifyMessage::Stopping]);
        assert_eq!(parse(b"READY=0\nREADY\n=1\n"), vec![]);
        assert_eq!(
            parse(b"MAINPID=42\nMAINPID=-1\nMAINPID=x"),
            vec![NotifyMessage::MainPid(42)]
        );
        assert_eq!(
            parse(b"STATUS=caf\xc3\xa9"),
            vec![NotifyMessage::Status("café".into())]
        );
        assert_eq!(parse(b"\xff\xfe"), vec![]);
        let long = format!("STATUS={}", "x".repeat(2000));
        assert_eq!(
            parse(long.as_bytes()),
            vec![NotifyMessage::Status("x".repeat(512))]
        );
    }
}
