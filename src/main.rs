//! The `normalizer` binary. Everything lives in the library; see `cli::main`.

fn main() -> std::process::ExitCode {
    normalizer::cli::main()
}
