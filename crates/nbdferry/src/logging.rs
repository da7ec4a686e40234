//! Where logs go and in what shape. `NBDFERRY_LOG` says what is logged
//! (`tracing` filter directives, default `warn`); `NBDFERRY_LOG_FORMAT`
//! says how: `text` (the default, for people) or `json`, one JSON object
//! per line with `timestamp`, `level`, `target`, `message` and the
//! event's fields at the top level, for log collectors.
//!
//! The daemon's status lines (`listening on ...`, `admin API on ...`) and
//! the final error pass whatever the filter says: scripts wait for them.
//! In text they are the plain lines the README documents; in JSON they are
//! objects like every other line, so a collector never meets a line it
//! cannot parse.

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

/// The target of the status lines in JSON.
const STATUS_TARGET: &str = "nbdferry::status";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

static FORMAT: OnceLock<Format> = OnceLock::new();

fn format() -> Format {
    FORMAT.get().copied().unwrap_or(Format::Text)
}

/// Installs the subscriber; an unknown `NBDFERRY_LOG_FORMAT` is an error.
pub fn init() -> Result<(), String> {
    let format = match std::env::var("NBDFERRY_LOG_FORMAT").as_deref() {
        Err(_) | Ok("" | "text") => Format::Text,
        Ok("json") => Format::Json,
        Ok(other) => {
            return Err(format!(
                "NBDFERRY_LOG_FORMAT={}: want text or json",
                other.escape_default()
            ));
        }
    };
    let _ = FORMAT.set(format);
    let filter = EnvFilter::try_from_env("NBDFERRY_LOG")
        .unwrap_or_else(|_| EnvFilter::new("warn,rustls=error"));
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    match format {
        Format::Text => builder
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        Format::Json => {
            let status = format!("{STATUS_TARGET}=info")
                .parse()
                .expect("a valid directive");
            builder
                .json()
                .flatten_event(true)
                .with_env_filter(filter.add_directive(status))
                .init()
        }
    }
    Ok(())
}

/// A status line for scripts and operators, never filtered out.
pub fn status(line: &str) {
    match format() {
        Format::Text => eprintln!("{line}"),
        Format::Json => tracing::info!(target: STATUS_TARGET, "{line}"),
    }
}

/// The error a command ends with.
pub fn fatal(line: &str) {
    match format() {
        Format::Text => eprintln!("error: {line}"),
        Format::Json => tracing::error!(target: STATUS_TARGET, "{line}"),
    }
}
