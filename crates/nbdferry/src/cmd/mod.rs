//! One module per subcommand, each with its clap arguments and `run`.

mod copy;
mod info;
mod map;
mod serve;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Export files and block devices over NBD.
    Serve(serve::ServeArgs),
    /// Show an export's size, flags, block sizes and meta contexts.
    Info(info::InfoArgs),
    /// List the extents of a meta context (like `nbdinfo --map`).
    Map(map::MapArgs),
    /// Copy a disk between NBD exports, local files and streams.
    Copy(copy::CopyArgs),
}

impl Command {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Serve(a) => serve::run(a).await,
            Command::Info(a) => info::run(a).await,
            Command::Map(a) => map::run(a).await,
            Command::Copy(a) => copy::run(a).await,
        }
    }
}
