//! `nbdferry certs init`: a CA, server and client certificate to try TLS.

use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    action: CertsAction,
}

#[derive(clap::Subcommand)]
enum CertsAction {
    /// Write ca-cert.pem, ca-key.pem, server-cert.pem, server-key.pem,
    /// client-cert.pem and client-key.pem (keys mode 0600) into DIR, the
    /// layout qemu, nbdkit and libnbd read. Existing files are never
    /// overwritten.
    Init {
        dir: PathBuf,
        /// Name the server certificate is valid for (repeatable); localhost,
        /// 127.0.0.1 and ::1 are always included.
        #[arg(long = "server-name", value_name = "NAME")]
        server_names: Vec<String>,
        /// Common name of the client certificate (what --allow-client matches).
        #[arg(long, value_name = "NAME", default_value = "nbdferry-client")]
        client_name: String,
    },
}

pub async fn run(args: CertsArgs) -> anyhow::Result<()> {
    match args.action {
        CertsAction::Init {
            dir,
            server_names,
            client_name,
        } => {
            for f in nbd_tls::generate_test_pki(&dir, &server_names, &client_name)? {
                println!("{}", f.display());
            }
            Ok(())
        }
    }
}
