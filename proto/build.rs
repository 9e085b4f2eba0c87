//! Compiles the drover.v1 protocol with protox (pure Rust, no protoc), with the JSON mapping of
//! its messages (pbjson), and derives the API version from the protocol files' bytes, so any
//! change to the protocol changes the version builders must present at Join.

use std::error::Error;

const PROTOS: [&str; 3] = [
    "proto/drover/v1/builder.proto",
    "proto/drover/v1/build.proto",
    "proto/drover/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    // The encoded descriptors, for gRPC server reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let encoded = prost::Message::encode_to_vec(&descriptors);
    fs_err::write(out.join("drover_descriptors.bin"), &encoded)?;
    // serde for every message, as the protobuf JSON mapping says (int64 as strings, enums by
    // name, bytes as base64), with the field names of the .proto files and every field written:
    // the HTTP API's bodies.
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .preserve_proto_field_names()
        .emit_fields()
        .build(&[".drover.v1"])?;
    // Malformed messages are INVALID_ARGUMENT, not prost's INTERNAL.
    tonic_prost_build::configure()
        .codec_path("crate::codec::Codec")
        .compile_fds(descriptors)?;

    // FNV-1a over the protocol files: stable across machines and toolchains.
    let mut fingerprint: u64 = 0xcbf2_9ce4_8422_2325;
    for proto in PROTOS {
        for byte in fs_err::read(proto)? {
            fingerprint ^= u64::from(byte);
            fingerprint = fingerprint.wrapping_mul(0x0100_0000_01b3);
        }
    }
    println!("cargo:rustc-env=DROVER_API_VERSION=v1-{fingerprint:016x}");
    Ok(())
}
