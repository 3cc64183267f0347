//! The sd_notify parser against a small independent reference: split the
//! bytes at `\n`, split each line at its first `=`, decode the value
//! (invalid UTF-8 replaced), act on READY=1, STOPPING=1, RELOADING=1,
//! STATUS= (first 512 characters) and MAINPID=<positive pid>.
#![no_main]

use baton::notify::{parse, NotifyMessage};
use libfuzzer_sys::fuzz_target;

fn reference(datagram: &[u8]) -> Vec<NotifyMessage> {
    let mut out = Vec::new();
    for line in datagram.split(|b| *b == b'\n') {
        let Some(eq) = line.iter().position(|b| *b == b'=') else {
            continue;
        };
        let (key, value) = (&line[..eq], &line[eq + 1..]);
        let value = String::from_utf8_lossy(value);
        match key {
            b"READY" | b"STOPPING" | b"RELOADING" if value != "1" => {}
            b"READY" => out.push(NotifyMessage::Ready),
            b"STOPPING" => out.push(NotifyMessage::Stopping),
            b"RELOADING" => out.push(NotifyMessage::Reloading),
            b"STATUS" => out.push(NotifyMessage::Status(value.chars().take(512).collect())),
            b"MAINPID" => {
                if let Some(pid) = value.parse::<i32>().ok().filter(|p| *p > 0) {
                    out.push(NotifyMessage::MainPid(pid));
                }
            }
            _ => {}
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    assert_eq!(parse(data), reference(data));
});
