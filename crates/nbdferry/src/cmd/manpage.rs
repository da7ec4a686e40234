//! `nbdferry manpage [--dir DIR]`: man pages generated from the CLI
//! definition: nbdferry(1) on stdout, or with `--dir` one page per
//! command (`nbdferry.1`, `nbdferry-serve.1`, `nbdferry-snapshot-create.1`,
//! ...) for packages to install under `/usr/share/man/man1`.

use std::path::PathBuf;

use anyhow::Context;
use clap::CommandFactory;

#[derive(clap::Args)]
pub struct ManpageArgs {
    /// Write every command's page into this directory (created if
    /// missing) instead.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

pub fn run(args: ManpageArgs) -> anyhow::Result<()> {
    let cli = crate::Cli::command();
    match args.dir {
        Some(dir) => std::fs::create_dir_all(&dir)
            .and_then(|()| clap_mangen::generate_to(cli, &dir))
            .with_context(|| format!("cannot write man pages to {}", dir.display())),
        None => clap_mangen::Man::new(cli)
            .render(&mut std::io::stdout())
            .context("cannot write the man page"),
    }
}
