fn main() -> std::process::ExitCode {
    ars_comp_1::main()
}
