//! `nbdferry map`: the extents of one meta context, with the same meaning,
//! coalescing and output (text and JSON) as `nbdinfo --map`.

use std::time::Duration;

use anyhow::{Context, bail};
use nbd_client::{Client, ConnectOptions, NbdUri};
use nbd_proto::consts::BASE_ALLOCATION;

#[derive(clap::Args)]
pub struct MapArgs {
    /// NBD URI of the export.
    uri: String,
    /// Meta context to map, e.g. qemu:dirty-bitmap:NAME.
    #[arg(long, default_value = BASE_ALLOCATION)]
    context: String,
    /// Summarise by type instead of listing extents.
    #[arg(long)]
    totals: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: MapArgs) -> anyhow::Result<()> {
    let uri = NbdUri::parse(&args.uri)?;
    let opts = ConnectOptions {
        meta_contexts: vec![args.context.clone()],
        handshake_timeout: Duration::from_secs(30),
        ..ConnectOptions::default()
    };
    let client = Client::connect(&uri, &opts)
        .await
        .with_context(|| format!("cannot open {uri}"))?;
    if !client.info().has_context(&args.context) {
        bail!(
            "server does not support metadata context \"{}\"",
            args.context
        );
    }
    let extents = collect(&client, &args.context).await?;
    let _ = client.disconnect().await;
    let runs = coalesce(&extents);
    let out = if args.totals {
        totals(&runs, extents_size(&runs), &args.context, args.json)
    } else {
        list(&runs, &args.context, args.json)
    };
    print!("{out}");
    Ok(())
}

/// Every extent from 0 to the end, in server order, like nbdinfo: requests
/// of at most 4 GiB minus the alignment, advancing by what came back.
async fn collect(client: &Client, context: &str) -> anyhow::Result<Vec<(u64, u64)>> {
    let size = client.size();
    let align = u64::from(client.info().block_size.map_or(512, |b| b.minimum));
    let max_len = u64::from(u32::MAX) - align + 1;
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < size {
        let reply = client
            .block_status(offset, (size - offset).min(max_len))
            .await?;
        let ctx = reply
            .into_iter()
            .find(|c| c.name == context)
            .context("server did not return any extents")?;
        for e in ctx.extents {
            out.push((e.length, e.flags));
            offset += e.length;
        }
    }
    Ok(out)
}

/// Merges neighbours of the same type: (offset, length, type).
fn coalesce(extents: &[(u64, u64)]) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    let mut offset = 0;
    for &(len, ty) in extents {
        match out.last_mut() {
            Some(last) if last.2 == ty => last.1 += len,
            _ => out.push((offset, len, ty)),
        }
        offset += len;
    }
    out
}

fn extents_size(runs: &[(u64, u64, u64)]) -> u64 {
    runs.iter().map(|r| r.1).sum()
}

/// nbdinfo's descriptions; None where it prints none.
fn describe(context: &str, ty: u64) -> Option<String> {
    if context == BASE_ALLOCATION {
        match ty {
            0 => Some("data".into()),
            1 => Some("hole".into()),
            2 => Some("zero".into()),
            3 => Some("hole,zero".into()),
            _ => None,
        }
    } else if context.starts_with("qemu:dirty-bitmap:") {
        match ty {
            0 => Some("clean".into()),
            1 => Some("dirty".into()),
            _ => None,
        }
    } else if context == "qemu:allocation-depth" {
        match ty {
            0 => Some("absent".into()),
            1 => Some("local".into()),
            n => Some(format!("backing depth {n}")),
        }
    } else {
        None
    }
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn list(runs: &[(u64, u64, u64)], context: &str, json: bool) -> String {
    let mut s = String::new();
    if json {
        s += "[\n";
        let items: Vec<String> = runs
            .iter()
            .map(|&(off, len, ty)| {
                let mut e = format!("{{ \"offset\": {off}, \"length\": {len}, \"type\": {ty}");
                if let Some(d) = describe(context, ty) {
                    e += &format!(", \"description\": {}", json_str(&d));
                }
                e + "}"
            })
            .collect();
        s += &items.join(",\n");
        s += "\n]\n";
    } else {
        for &(off, len, ty) in runs {
            s += &format!("{off:>10}  {len:>10}  {ty:>3}");
            if let Some(d) = describe(context, ty) {
                s += &format!("  {d}");
            }
            s += "\n";
        }
    }
    s
}

fn totals(runs: &[(u64, u64, u64)], size: u64, context: &str, json: bool) -> String {
    let mut by_type: std::collections::BTreeMap<u64, u64> = Default::default();
    for &(_, len, ty) in runs {
        *by_type.entry(ty).or_default() += len;
    }
    let mut s = String::new();
    let mut items = Vec::new();
    for (&ty, &total) in &by_type {
        let pct = if size == 0 {
            0.0
        } else {
            100.0 * total as f64 / size as f64
        };
        let d = describe(context, ty);
        if json {
            let mut e = format!(
                "{{ \"size\": {total}, \"percent\": {}, \"type\": {ty}",
                fmt_g(pct)
            );
            if let Some(d) = d {
                e += &format!(", \"description\": {}", json_str(&d));
            }
            items.push(e + " }");
        } else {
            let mut line = format!("{total:>10} {pct:>5.1}% {ty:>3}");
            if let Some(d) = d {
                line += &format!(" {d}");
            }
            s += &line;
            s += "\n";
        }
    }
    if json {
        s = format!("[\n{}\n]\n", items.join(",\n"));
    }
    s
}

/// C's `%g`: six significant digits, trailing zeros dropped.
fn fmt_g(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let exp = v.abs().log10().floor() as i32;
    if !(-4..6).contains(&exp) {
        return format!("{v:e}");
    }
    let decimals = (5 - exp).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_nbdinfo() {
        assert_eq!(fmt_g(7.910156), "7.91016");
        assert_eq!(fmt_g(92.08984375), "92.0898");
        assert_eq!(fmt_g(100.0), "100");
        assert_eq!(fmt_g(25.0), "25");
        let runs = coalesce(&[(4096, 0), (4096, 0), (8192, 3)]);
        assert_eq!(runs, vec![(0, 8192, 0), (8192, 8192, 3)]);
        assert_eq!(
            list(&runs, BASE_ALLOCATION, true),
            "[\n{ \"offset\": 0, \"length\": 8192, \"type\": 0, \"description\": \"data\"},\n\
             { \"offset\": 8192, \"length\": 8192, \"type\": 3, \"description\": \"hole,zero\"}\n]\n"
        );
        assert_eq!(
            totals(&runs, 16384, BASE_ALLOCATION, false),
            "      8192  50.0%   0 data\n      8192  50.0%   3 hole,zero\n"
        );
    }
}
