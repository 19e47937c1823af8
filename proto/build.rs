// Generate the gRPC code from warden.proto with protox (a pure-Rust protobuf compiler:
// no `protoc` needed on the build machine).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "warden.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
