//! ggml block dequantization against the `gguf` package's reference (`tests/fixtures/make_gguf_quants.py`):
//! every value bit-identical. Q8_K, which the package cannot dequantize, against an independent computation.

use std::path::Path;

use ferrotune_core::gguf::{dequantize, TensorType};

fn fixture(name: &str) -> (Vec<u8>, Vec<f32>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf-quants");
    let raw = std::fs::read(dir.join(format!("{name}.bin"))).expect("fixture");
    let want = std::fs::read(dir.join(format!("{name}.f32"))).expect("fixture");
    (raw, want.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect())
}

#[test]
fn every_block_type_dequantizes_bit_identically_to_the_gguf_package() {
    for (name, ty) in [
        ("Q4_0", TensorType::Q4_0),
        ("Q4_1", TensorType::Q4_1),
        ("Q5_0", TensorType::Q5_0),
        ("Q5_1", TensorType::Q5_1),
        ("Q8_0", TensorType::Q8_0),
        ("Q2_K", TensorType::Q2_K),
        ("Q3_K", TensorType::Q3_K),
        ("Q4_K", TensorType::Q4_K),
        ("Q5_K", TensorType::Q5_K),
        ("Q6_K", TensorType::Q6_K),
    ] {
        let (raw, want) = fixture(name);
        let got = dequantize(ty, &raw, want.len());
        assert_eq!(got.len(), want.len(), "{name}");
        let bad: Vec<usize> = (0..want.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
        assert!(
            bad.is_empty(),
            "{name}: {} values differ, first at {}: {} vs {}",
            bad.len(),
            bad[0],
            got[bad[0]],
            want[bad[0]]
        );
        assert!(want.iter().any(|&v| v != 0.0), "{name}: fixture of zeros tests nothing");
    }
}

#[test]
fn q8_k_is_its_f32_scale_times_its_bytes() {
    let mut b = Vec::new();
    b.extend(0.375f32.to_le_bytes());
    b.extend((0..256).map(|i| (i as i8).wrapping_sub(100) as u8));
    b.extend([0u8; 32]);
    let got = dequantize(TensorType::Q8_K, &b, 256);
    for (i, v) in got.iter().enumerate() {
        assert_eq!(*v, 0.375 * (i as i8).wrapping_sub(100) as f32);
    }
}
