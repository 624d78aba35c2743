fn main() -> std::process::ExitCode {
    legacy_proxy_1::main()
}
