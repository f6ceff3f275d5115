//! `rewind`: the desktop window, the tray icon and the command line, thin layers over
//! `rewind-core`.

#![forbid(unsafe_code)]

mod bootcheck_cli;
mod cli;
mod daemon;
mod error_text;
mod exit;
mod files_cli;
mod generate;
mod gui;
mod logging;
mod notify;
mod progress_cli;
mod protect_cli;
mod restore_cli;
mod service;
mod service_cli;
mod store_cli;
mod thumbnail;
mod tray_app;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The engine (in the window or the protection service) makes pictures' thumbnails here.
    thumbnail::install();
    let args = match cli::Args::try_parse() {
        Ok(args) => args,
        Err(e) => return ExitCode::from(exit::usage(&e)),
    };
    // The daemon sets its log up itself, with its lines on stderr too. Generating the man
    // pages and completions (while a package is built) logs nothing.
    if !matches!(
        args.command,
        Some(cli::Command::Daemon | cli::Command::Service | cli::Command::Generate(_))
    ) {
        logging::init(false);
    }
    let json = args.command.as_ref().is_some_and(cli::Command::json);
    let mut used = false;
    let result = match &args.command {
        Some(command) => {
            let mut stdout = exit::Watched::new(std::io::stdout().lock());
            let result = cli::run(&args, command, &mut stdout);
            used = stdout.used();
            result
        }
        None => gui::run(gui::RunOptions {
            uri: args.connect.clone().filter(|u| !u.trim().is_empty()),
            minimized: args.minimized,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // One line, `error:` first, the whole cause chain (what failed and what to do),
        // each cause once; with --json the error object on stdout too; the exit code of
        // its kind.
        Err(e) => ExitCode::from(exit::fail(&e, json, used)),
    }
}
