//! NF4 against bitsandbytes: identical codes, double-quantized statistics and dequantized values on a
//! fixed matrix quantized by bitsandbytes 0.50 on the CPU (`tests/fixtures/make_nf4.py`).

use std::path::Path;

use ferrotune_core::nf4::{dynamic_map, Nf4Weight};
use ferrotune_core::weights::WeightFiles;
use tch::Kind;

#[test]
fn nf4_matches_bitsandbytes() {
    let f = WeightFiles::open_files(&[
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/nf4/reference.safetensors")
    ])
    .unwrap();
    let get = |k: &str| f.load_raw(k).unwrap();
    let code2: Vec<f32> = Vec::try_from(get("code2")).unwrap();
    assert_eq!(dynamic_map().to_vec(), code2, "dynamic map");
    let q = Nf4Weight::quantize(&get("weight")).unwrap();
    let packed: Vec<u8> = Vec::try_from(&q.packed).unwrap();
    let want: Vec<u8> = Vec::try_from(get("packed")).unwrap();
    let same = packed.iter().zip(&want).filter(|(a, b)| a == b).count();
    assert_eq!(same, want.len(), "packed codes: {same}/{} bytes equal", want.len());
    let qa: Vec<u8> = Vec::try_from(&q.qabsmax).unwrap();
    assert_eq!(qa, Vec::<u8>::try_from(get("qabsmax")).unwrap(), "8-bit absmax");
    let a2: Vec<f32> = Vec::try_from(&q.absmax2).unwrap();
    assert_eq!(a2, Vec::<f32>::try_from(get("absmax2")).unwrap(), "second-level scales");
    assert_eq!(q.offset, get("offset").double_value(&[0]) as f32, "offset");
    let d = q.dequantize(Kind::Float).unwrap();
    let diff = (&d - get("dequantized")).abs().max().double_value(&[]);
    assert!(diff < 1e-7, "dequantized differs by {diff}");
}
