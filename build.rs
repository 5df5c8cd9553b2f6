//! Compiles proto/ferry.proto (prost messages, tonic services). Needs `protoc`
//! (Debian: protobuf-compiler; tools/setup.sh installs it).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ferry.proto");
    tonic_build::configure()
        .bytes(["."])
        .compile_protos(&["proto/ferry.proto"], &["proto"])?;
    Ok(())
}
