//! Generates the CA service's messages, client and server from `proto/` (no `protoc`: protox
//! parses the .proto files in Rust and hands tonic-build their descriptors).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/istio/v1/auth/ca.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
