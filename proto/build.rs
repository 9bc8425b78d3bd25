//! Compiles `ferrotune/v1/*.proto` into OUT_DIR with tonic-prost-build and emits a file descriptor set
//! for gRPC reflection. protoc comes from `protoc-bin-vendored`, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos: Vec<std::path::PathBuf> = std::fs::read_dir("ferrotune/v1")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    // The directory too, so that a new .proto file triggers a rebuild.
    println!("cargo:rerun-if-changed=ferrotune/v1");
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("ferrotune_descriptor.bin"))
        .compile_protos(&protos, &[std::path::PathBuf::from(".")])?;
    Ok(())
}
