//! ferrotune's gRPC contracts. Code is generated here, and only here, from `ferrotune/v1/*.proto`;
//! every service and the CLI use these types.

/// Package `ferrotune.v1`.
#[allow(clippy::all, missing_docs, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("ferrotune.v1");
}

/// Encoded `FileDescriptorSet` of all ferrotune protos, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ferrotune_descriptor");
