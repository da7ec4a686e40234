//! `nbdferry info`: an export's size, flags, block sizes and meta contexts
//! (or every export's, with `--list`), as text or JSON in the shape of
//! `nbdinfo --json`.

use std::time::Duration;

use anyhow::Context;
use nbd_client::{Client, ConnectOptions, ExportInfo, NbdUri, ReplyMode};
use nbd_proto::consts::hflag;
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct InfoArgs {
    /// NBD URI, e.g. nbd://127.0.0.1:10809/disk or nbd+unix:///disk?socket=/run/nbd.sock
    uri: String,
    /// Show every export the server lists.
    #[arg(long)]
    list: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

const TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(args: InfoArgs) -> anyhow::Result<()> {
    let uri = NbdUri::parse(&args.uri)?;
    let exports: Vec<(NbdUri, Option<String>)> = if args.list {
        let list = nbd_client::list_exports(&uri, TIMEOUT)
            .await
            .with_context(|| format!("cannot list the exports of {uri}"))?;
        list.into_iter()
            .map(|e| {
                let mut u = uri.clone();
                u.export = e.name;
                (u, Some(e.description).filter(|d| !d.is_empty()))
            })
            .collect()
    } else {
        vec![(uri.clone(), None)]
    };
    let opts = ConnectOptions {
        list_contexts: true,
        handshake_timeout: TIMEOUT,
        ..ConnectOptions::default()
    };
    let mut infos = Vec::new();
    for (u, listed_description) in exports {
        let client = Client::connect(&u, &opts)
            .await
            .with_context(|| format!("cannot open {u}"))?;
        let mut info = client.info().clone();
        info.description = info.description.filter(|d| !d.is_empty());
        if info.description.is_none() {
            info.description = listed_description;
        }
        let _ = client.disconnect().await;
        infos.push((u, info));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&infos))?);
    } else {
        print!("{}", to_text(&infos));
    }
    Ok(())
}

fn protocol(info: &ExportInfo) -> &'static str {
    if info.handshake_flags & hflag::FIXED_NEWSTYLE != 0 {
        "newstyle-fixed"
    } else {
        "newstyle"
    }
}

fn flags(info: &ExportInfo) -> Vec<(&'static str, bool)> {
    vec![
        ("is_rotational", info.is_rotational()),
        ("is_read_only", info.read_only()),
        ("can_cache", info.can_cache()),
        ("can_df", info.can_df()),
        ("can_fast_zero", info.can_fast_zero()),
        ("can_flush", info.can_flush()),
        ("can_fua", info.can_fua()),
        ("can_multi_conn", info.can_multi_conn()),
        ("can_trim", info.can_trim()),
        ("can_zero", info.can_zero()),
    ]
}

fn block_sizes(info: &ExportInfo) -> Vec<(&'static str, u32)> {
    match info.block_size {
        Some(b) => vec![
            ("block_size_minimum", b.minimum),
            ("block_size_preferred", b.preferred),
            ("block_size_maximum", b.maximum),
        ],
        None => Vec::new(),
    }
}

fn to_json(infos: &[(NbdUri, ExportInfo)]) -> Value {
    let first = infos.first().map(|(_, i)| i);
    let exports: Vec<Value> = infos
        .iter()
        .map(|(uri, info)| {
            let mut m = serde_json::Map::new();
            m.insert("export-name".into(), json!(uri.export));
            if let Some(d) = &info.description {
                m.insert("description".into(), json!(d));
            }
            m.insert("uri".into(), json!(uri.to_string()));
            if let Some(c) = &info.available_contexts {
                m.insert("contexts".into(), json!(c));
            }
            for (k, v) in flags(info) {
                m.insert(k.into(), json!(v));
            }
            for (k, v) in block_sizes(info) {
                m.insert(k.into(), json!(v));
            }
            m.insert("export-size".into(), json!(info.size));
            Value::Object(m)
        })
        .collect();
    json!({
        "protocol": first.map_or("newstyle-fixed", protocol),
        // nbds URIs never fall back to plaintext, so TLS is what they say.
        "TLS": infos.first().is_some_and(|(u, _)| u.tls),
        "structured": first.is_some_and(|i| i.mode != ReplyMode::Simple),
        "extended": first.is_some_and(|i| i.mode == ReplyMode::Extended),
        "exports": exports,
    })
}

fn to_text(infos: &[(NbdUri, ExportInfo)]) -> String {
    let mut s = String::new();
    if let Some((uri, i)) = infos.first() {
        let replies = match i.mode {
            ReplyMode::Extended => "using extended headers",
            ReplyMode::Structured => "using structured packets",
            ReplyMode::Simple => "using simple packets",
        };
        let tls = if uri.tls { "with" } else { "without" };
        s += &format!("protocol: {} {tls} TLS, {replies}\n", protocol(i));
    }
    for (uri, info) in infos {
        s += &format!("export=\"{}\":\n", uri.export);
        if let Some(d) = &info.description {
            s += &format!("\tdescription: {d}\n");
        }
        s += &format!("\texport-size: {}\n", info.size);
        s += &format!("\turi: {uri}\n");
        if let Some(c) = &info.available_contexts {
            s += "\tcontexts:\n";
            for name in c {
                s += &format!("\t\t{name}\n");
            }
        }
        for (k, v) in flags(info) {
            s += &format!("\t{k}: {v}\n");
        }
        for (k, v) in block_sizes(info) {
            s += &format!("\t{k}: {v}\n");
        }
    }
    s
}
