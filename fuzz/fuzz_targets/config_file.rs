//! The configuration file parser and the merge with the `run` flags, as
//! `baton run` and every upgrade use them: no panic, and every error (parse
//! or merge) stays on one line.
#![no_main]

use std::path::Path;

use baton::config::{Config, FileConfig, Overrides};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = match FileConfig::parse(text) {
        Ok(file) => file,
        Err(e) => {
            assert!(!e.contains('\n'), "multi-line error: {e}");
            return;
        }
    };
    // With no flags the file decides everything; with a command flag (the
    // usual `baton run --config … -- CMD`) the flag wins.
    let flags = [
        Overrides::default(),
        Overrides {
            command: vec!["./server".into()],
            ..Default::default()
        },
    ];
    let mut file = Some(file);
    for flags in &flags {
        let f = file
            .take()
            .unwrap_or_else(|| FileConfig::parse(text).expect("parsed before"));
        match Config::merge(f, flags, Path::new("/srv/app")) {
            Ok(c) => {
                assert!(!c.command.is_empty() && !c.command[0].is_empty());
                assert!(c.backlog >= 1);
            }
            Err(e) => assert!(!e.to_string().contains('\n'), "multi-line error: {e}"),
        }
    }
});
