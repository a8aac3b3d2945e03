//! The `dmd` program; see `dmd_experiments::cli`.

fn main() {
    dmd_experiments::cli::main()
}
