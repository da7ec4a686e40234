//! `nbdferry completions SHELL`: the shell completion script, generated
//! from the CLI definition so that it never lags behind it.

use clap::CommandFactory;

#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

pub fn run(args: CompletionsArgs) -> anyhow::Result<()> {
    let mut cli = crate::Cli::command();
    let name = cli.get_name().to_string();
    clap_complete::generate(args.shell, &mut cli, name, &mut std::io::stdout());
    Ok(())
}
