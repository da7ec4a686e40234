//! `nbdferry backup run --admin URL --disk DISK --repo REPO`: one point of
//! a disk an nbdferry daemon serves (`ferry_jobs::backup_run`). This file
//! only finds the daemon's NBD address and prints the result.

use std::path::Path;

use anyhow::Context;
use ferry_api::Endpoint;
use ferry_jobs::backup_run::RunReport;
use nbd_client::{NbdUri, Transport};

use super::backup::{CreateArgs, JobArgs, RepoArgs};
use crate::admin::AdminArg;

#[derive(clap::Args)]
pub(super) struct RunArgs {
    /// With --tls-creds DIR: the same client certificate opens the
    /// https:// admin API and the nbds:// snapshot export.
    #[command(flatten)]
    admin: AdminArg,
    /// The disk's name on the daemon, also its name in the repository.
    #[arg(long, value_name = "DISK")]
    disk: String,
    #[command(flatten)]
    repo: RepoArgs,
    /// Where the daemon serves NBD (an nbd://, nbds:// or nbd+unix:// URI;
    /// the export name is ignored) [default: nbds://HOST for an https://HOST
    /// --admin, else nbd://127.0.0.1, `serve`'s default listener].
    #[arg(long, value_name = "URI")]
    nbd: Option<String>,
    #[command(flatten)]
    create: CreateArgs,
    /// Print the result as one JSON object on standard output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    job: JobArgs,
}

pub(super) async fn run(a: RunArgs) -> anyhow::Result<()> {
    ferry_repo::check_name(&a.disk)?;
    let endpoint = a.admin.endpoint()?;
    let nbd = nbd_base(a.nbd.as_deref(), &endpoint, a.admin.tls_creds())?;
    let api = ferry_api::AdminClient::new(endpoint);
    let repo = a.repo.open_or_create(&a.create).await?;
    let opts = a.job.options();
    let report = a
        .job
        .with_progress(|p| ferry_jobs::backup_run::run(&api, &repo, &a.disk, &nbd, &opts, p))
        .await
        .map_err(|e| match &e {
            // The address was a guess: say how to correct it.
            ferry_jobs::Error::Nbd { .. } if a.nbd.is_none() => anyhow::Error::new(e).context(
                format!("is the daemon serving NBD at {nbd}? if not, give --nbd URI"),
            ),
            _ => anyhow::Error::new(e),
        })
        .with_context(|| format!("backup run of {} failed", a.disk))?;
    if a.json {
        println!("{}", summary_json(&report));
    } else {
        println!("{}", summary_line(&report));
    }
    Ok(())
}

/// The daemon's NBD listener: `--nbd`, else the admin host on the NBD
/// port (over TLS, as the admin API is), else `serve`'s default. The
/// client certificates go with it whenever it is TLS.
fn nbd_base(
    nbd: Option<&str>,
    admin: &Endpoint,
    tls_creds: Option<&Path>,
) -> anyhow::Result<NbdUri> {
    let mut uri = match (nbd, admin) {
        (Some(u), _) => NbdUri::parse(u).with_context(|| format!("--nbd {u}"))?,
        (None, Endpoint::Https { host, .. }) => NbdUri {
            transport: Transport::Tcp {
                host: host.clone(),
                port: nbd_client::DEFAULT_PORT,
            },
            export: String::new(),
            tls: true,
            user: None,
            params: Vec::new(),
        },
        (None, Endpoint::Unix(_)) => {
            let mut u = NbdUri::parse("nbd://127.0.0.1").context("the default --nbd")?;
            u.tls = tls_creds.is_some();
            u
        }
    };
    if uri.tls
        && let Some(dir) = tls_creds
        && !uri.params.iter().any(|(k, _)| k == "tls-certificates")
    {
        uri.params.push((
            "tls-certificates".into(),
            dir.to_string_lossy().into_owned(),
        ));
    }
    Ok(uri)
}

fn kind(r: &RunReport) -> &'static str {
    if r.pull.incremental {
        "incremental"
    } else {
        "full"
    }
}

fn summary_line(r: &RunReport) -> String {
    let p = &r.pull.point;
    let how = match (&p.parent, &p.full_reason) {
        (Some(parent), _) => format!("incremental on {parent}"),
        (None, Some(why)) => format!("full ({why})"),
        (None, None) => "full".into(),
    };
    let mut line = format!(
        "{}@{}: {how}; {} of {} bytes read, {} new chunks ({} bytes stored) in {:.1} s",
        p.disk,
        p.point,
        r.pull.copy.read,
        p.size,
        p.stats.new_chunks,
        p.stats.new_bytes,
        r.duration.as_secs_f64()
    );
    for w in &r.warnings {
        line.push_str(&format!("; {w}"));
    }
    line
}

fn summary_json(r: &RunReport) -> serde_json::Value {
    let p = &r.pull.point;
    serde_json::json!({
        "disk": p.disk,
        "point": p.point,
        "kind": kind(r),
        "full_reason": p.full_reason,
        "parent": p.parent,
        "checkpoint": p.checkpoint,
        "reused_snapshot": r.reused,
        "size": p.size,
        "bytes_read": r.pull.copy.read,
        "bytes_stored": p.stats.new_bytes,
        "new_chunks": p.stats.new_chunks,
        "resumed_bytes": r.pull.resumed,
        "duration_ms": r.duration.as_millis() as u64,
        "warnings": r.warnings,
    })
}
