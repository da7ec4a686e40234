//! `nbdferry certs init|client`: a CA, server and client certificates to
//! try TLS, and more client identities from that CA.

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
    /// Issue a client certificate for identity NAME from the CA in CA_DIR
    /// (made by `certs init`) into OUT_DIR: ca-cert.pem, client-cert.pem and
    /// client-key.pem, for one more client (a backup server, a migration
    /// peer) with its own identity. Existing files are never overwritten.
    Client {
        ca_dir: PathBuf,
        /// The certificate's CN and SAN: what allow lists and admin grants
        /// match.
        name: String,
        out_dir: PathBuf,
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
        CertsAction::Client {
            ca_dir,
            name,
            out_dir,
        } => {
            for f in nbd_tls::issue_client_cert(&ca_dir, &name, &out_dir)? {
                println!("{}", f.display());
            }
            Ok(())
        }
    }
}
