//! `rewind`: the desktop window, the tray icon and the command line, thin layers over
//! `rewind-core`.

#![forbid(unsafe_code)]

mod cli;
mod daemon;
mod error_text;
mod generate;
mod gui;
mod logging;
mod notify;
mod protect_cli;
mod restore_cli;
mod service;
mod service_cli;
mod store_cli;
mod tray_app;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    // The daemon sets its log up itself, with its lines on stderr too. Generating the man
    // pages and completions (while a package is built) logs nothing.
    if !matches!(
        args.command,
        Some(cli::Command::Daemon | cli::Command::Service | cli::Command::Generate(_))
    ) {
        logging::init(false);
    }
    let result = match &args.command {
        Some(command) => cli::run(&args, command, &mut std::io::stdout().lock()),
        None => gui::run(gui::RunOptions {
            uri: args.connect.clone().filter(|u| !u.trim().is_empty()),
            minimized: args.minimized,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, `error:` first, the whole cause chain (what failed and what to do),
            // each cause once.
            eprintln!("error: {}", error_text::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
