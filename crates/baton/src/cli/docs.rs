//! `baton completions SHELL` and `baton man`: generated from the clap
//! definitions by the installed binary itself, so they always match the
//! version that runs (no build step or source tree needed to install
//! them; see docs/operations.md).

use std::io::Write;

use clap::CommandFactory;

use super::{Cli, CliError, EXIT_OK};

pub fn completions(shell: clap_complete::aot::Shell) -> Result<u8, CliError> {
    let mut out = Vec::new();
    clap_complete::aot::generate(shell, &mut Cli::command(), "baton", &mut out);
    write_stdout(&out)
}

/// One page, baton(1), holding every subcommand's synopsis and options
/// (as `baton-run` … subsections), so `man baton` shows everything.
pub fn man() -> Result<u8, CliError> {
    write_stdout(&render_man()?)
}

fn render_man() -> Result<Vec<u8>, CliError> {
    let err = CliError::Stdout;
    let mut cmd = Cli::command();
    // Gives each subcommand its full name (`baton run`) for its synopsis.
    cmd.build();
    let page = clap_mangen::Man::new(cmd.clone());
    let mut out = Vec::new();
    page.render_title(&mut out).map_err(err)?;
    page.render_name_section(&mut out).map_err(err)?;
    page.render_synopsis_section(&mut out).map_err(err)?;
    page.render_description_section(&mut out).map_err(err)?;
    page.render_options_section(&mut out).map_err(err)?;
    // clap's own `help` subcommand needs no section.
    let subs: Vec<&clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .collect();
    // The list points to the sections below, not to pages of their own.
    writeln!(out, ".SH SUBCOMMANDS").map_err(err)?;
    for sub in &subs {
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        writeln!(
            out,
            ".TP\n\\fBbaton {}\\fR\n{}",
            sub.get_name(),
            roff_text(&about)
        )
        .map_err(err)?;
    }
    for sub in subs {
        let name = sub.get_bin_name().unwrap_or(sub.get_name()).to_owned();
        writeln!(out, ".SH \"{}\"", name.to_uppercase()).map_err(err)?;
        let sub_page = clap_mangen::Man::new(sub.clone());
        let mut sections = Vec::new();
        sub_page
            .render_description_section(&mut sections)
            .map_err(err)?;
        sub_page
            .render_synopsis_section(&mut sections)
            .map_err(err)?;
        sub_page
            .render_options_section(&mut sections)
            .map_err(err)?;
        // Its sections become subsections of this one.
        for line in String::from_utf8_lossy(&sections).lines() {
            match line.strip_prefix(".SH ") {
                Some(title) => writeln!(out, ".SS {title}"),
                None => writeln!(out, "{line}"),
            }
            .map_err(err)?;
        }
    }
    page.render_version_section(&mut out).map_err(err)?;
    Ok(out)
}

/// Plain text as a roff text line: backslashes and dashes escaped, and
/// no line starting with a control character.
fn roff_text(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    match escaped.chars().next() {
        Some('.' | '\'') => format!("\\&{escaped}"),
        _ => escaped,
    }
}

fn write_stdout(bytes: &[u8]) -> Result<u8, CliError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(CliError::Stdout)?;
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand gets its section, with its own options.
    #[test]
    fn the_man_page_has_every_subcommand_and_its_options() {
        let page = String::from_utf8(render_man().unwrap()).unwrap();
        assert!(page.contains("\n.TH baton 1 "), "{}", &page[..200]);
        for sub in Cli::command().get_subcommands() {
            if sub.is_hide_set() {
                assert!(!page.contains(sub.get_name()), "hidden {}", sub.get_name());
                continue;
            }
            let heading = format!(".SH \"BATON {}\"", sub.get_name().to_uppercase());
            assert!(page.contains(&heading), "no {heading}");
        }
        assert!(page.contains("\\-\\-metrics"), "run's options are there");
        assert!(page.contains("\\-\\-canary"), "upgrade's options are there");
        assert_eq!(
            page.matches(".SH OPTIONS").count(),
            1,
            "one top-level OPTIONS"
        );
        assert!(
            !page.contains("(1)"),
            "no pointer to pages that do not exist"
        );
    }

    #[test]
    fn text_is_escaped_for_roff() {
        assert_eq!(roff_text("zero-downtime"), "zero\\-downtime");
        assert_eq!(roff_text(".hidden"), "\\&.hidden");
        assert_eq!(roff_text("a\\b"), "a\\eb");
    }
}
