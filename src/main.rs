//! The `outpost` binary: parse, run, map errors to exit codes (0 ok, 1 a target
//! did not succeed, 2 an error or a usage error). Everything else is in
//! `outpost::cli`.

use std::process::ExitCode;

use outpost::cli::{self, Early};

fn main() -> ExitCode {
    let args: Vec<String> = match std::env::args_os()
        .map(std::ffi::OsString::into_string)
        .collect()
    {
        Ok(args) => args,
        Err(bad) => {
            eprintln!("outpost: error: argument {bad:?} is not UTF-8");
            return ExitCode::from(2);
        }
    };
    let parsed = match cli::parse(&args) {
        Ok(parsed) => parsed,
        Err(Early::Help(text)) => {
            println!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(Early::Usage(text)) => {
            eprintln!("{text}");
            return ExitCode::from(2);
        }
    };
    match cli::run(parsed) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("outpost: error: {e}");
            ExitCode::from(2)
        }
    }
}
