fn main() -> std::process::ExitCode {
    legacy_proxy_2::main()
}
