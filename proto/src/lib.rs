//! ferrotune's gRPC contracts. Code is generated here, and only here, from `ferrotune/v1/*.proto`;
//! every service and the CLI use these types.

/// Package `ferrotune.v1`.
#[allow(clippy::all, missing_docs, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("ferrotune.v1");
}

/// Encoded `FileDescriptorSet` of all ferrotune protos, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ferrotune_descriptor");

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::v1::{ModelRef, PerplexityResult};

    #[test]
    fn generated_messages_round_trip() {
        let m = PerplexityResult { tokens: 38, mean_nll: 4.25, perplexity: 4.25f64.exp() };
        assert_eq!(PerplexityResult::decode(m.encode_to_vec().as_slice()).unwrap(), m);
        let r = ModelRef { path: "models/smollm2".into() };
        assert_eq!(ModelRef::decode(r.encode_to_vec().as_slice()).unwrap().path, "models/smollm2");
    }

    #[test]
    fn descriptor_set_names_the_package() {
        let needle = b"ferrotune.v1";
        assert!(super::FILE_DESCRIPTOR_SET.windows(needle.len()).any(|w| w == needle));
    }
}
