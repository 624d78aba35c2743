fn main() -> std::process::ExitCode {
    ars_comp_2::main()
}
