//! remoractl: the CLI platform teams use. For now it validates config
//! offline (`check`); the control-plane commands arrive with the control
//! plane.
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "remoractl", version, about = "Remora mesh CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate config offline (no server needed). Exit 0 when valid, 1 when
    /// any resource is invalid, 2 when the files cannot be read.
    Check {
        /// A YAML file or a directory of them.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { file } => match remora_proto::load_path(&file) {
            Err(e @ remora_proto::LoadError::Io { .. }) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
            Ok((_, cfg)) => match remora_proto::prepare(cfg) {
                Ok(cfg) => {
                    println!(
                        "ok: {} services, {} HTTP routes",
                        cfg.services.len(),
                        cfg.http_routes.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(errs) => {
                    eprintln!("{errs}");
                    ExitCode::from(1)
                }
            },
        },
    }
}
