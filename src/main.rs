//! The `brume` binary: parses the command line and turns the library's result into
//! an exit code. Everything else lives in the library.

fn main() -> std::process::ExitCode {
    brume::cli::main()
}
