//! The `recycle` binary: parse the command line, hand it to the library, report errors.

use clap::Parser;

fn main() -> std::process::ExitCode {
    recycle::cli::quiet_broken_pipe();
    recycle::alloc::tune();
    let cli = recycle::cli::Cli::parse();
    match recycle::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("Error: {err:#}");
            std::process::ExitCode::from(2)
        }
    }
}
