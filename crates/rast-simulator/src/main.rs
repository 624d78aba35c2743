fn main() -> std::process::ExitCode {
    rast_simulator::main(std::env::args_os())
}
