//! TensorBoard event files: `events.out.tfevents.<time>.<host>.<pid>` records, each framed as TensorFlow's
//! TFRecord (u64 length, masked CRC-32C of the length, the serialized `Event`, masked CRC-32C of it), holding
//! scalar summaries (one per metric and step) and a text summary of the resolved recipe. A resumed run writes
//! a `SessionLog START` at its first step, so TensorBoard drops the steps a crash left past the checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};

/// TensorFlow's `Event` (tensorflow/core/util/event.proto), the fields written here.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// Global step.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// `brain.Event:2` in a file's first event.
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    /// Scalars and text.
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
    /// Session start (marks a restart for TensorBoard's purge of orphaned steps).
    #[prost(message, optional, tag = "6")]
    pub session_log: Option<SessionLog>,
}

/// `Summary`: tagged values.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// The values.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `Summary.Value`: a scalar (`simple_value`) or a tensor with plugin metadata (text).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    /// Tag (the metric's name).
    #[prost(string, tag = "1")]
    pub tag: String,
    /// A scalar.
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    /// A tensor (text summaries).
    #[prost(message, optional, tag = "8")]
    pub tensor: Option<TensorProto>,
    /// Which plugin shows the value.
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
}

/// `SummaryMetadata`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryMetadata {
    /// The plugin.
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

/// `SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PluginData {
    /// `text`.
    #[prost(string, tag = "1")]
    pub plugin_name: String,
}

/// `TensorProto`, as a string tensor of shape [1].
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    /// `DT_STRING` = 7.
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    /// Shape.
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
    /// The strings.
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// `TensorShapeProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShape {
    /// Dimensions.
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<Dim>,
}

/// `TensorShapeProto.Dim`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Dim {
    /// Size.
    #[prost(int64, tag = "1")]
    pub size: i64,
}

/// `SessionLog`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    /// START = 1.
    #[prost(int32, tag = "1")]
    pub status: i32,
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord frames use.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

/// TFRecord's masked CRC: rotated right by 15 and offset, so that a CRC of CRCs does not degenerate.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord frame around `data`.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// An open event file.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
    restart_pending: bool,
}

fn now_s() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl EventWriter {
    /// A new event file in `dir` (created); `resumed` marks the first step written as a restart.
    pub fn create(dir: &Path, resumed: bool) -> std::io::Result<Self> {
        ferrotune_core::fsx::create_dir_all(dir)?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host: String = host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        let now = now_s();
        let path = dir.join(format!(
            "events.out.tfevents.{}.{}.{}.{}",
            now as u64,
            if host.is_empty() { "localhost" } else { &host },
            std::process::id(),
            (now.fract() * 1e6) as u64
        ));
        let file = ferrotune_core::fsx::append(&path)?;
        let mut w = Self { file, path, restart_pending: resumed };
        w.write(&Event { wall_time: now, file_version: Some("brain.Event:2".into()), ..Default::default() })?;
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, ev: &Event) -> std::io::Result<()> {
        self.file.write_all(&frame(&prost::Message::encode_to_vec(ev)))?;
        self.file.flush()
    }

    /// Scalars of one step (non-finite values are left out).
    pub fn scalars(&mut self, step: i64, values: &[(String, f64)]) -> std::io::Result<()> {
        if std::mem::take(&mut self.restart_pending) {
            self.write(&Event {
                wall_time: now_s(),
                step,
                session_log: Some(SessionLog { status: 1 }),
                ..Default::default()
            })?;
        }
        let value = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(k, v)| SummaryValue { tag: k.clone(), simple_value: Some(*v as f32), ..Default::default() })
            .collect();
        self.write(&Event { wall_time: now_s(), step, summary: Some(Summary { value }), ..Default::default() })
    }

    /// A text summary (TensorBoard's text plugin renders it as Markdown).
    pub fn text(&mut self, step: i64, tag: &str, text: &str) -> std::io::Result<()> {
        let value = SummaryValue {
            tag: tag.into(),
            tensor: Some(TensorProto {
                dtype: 7,
                tensor_shape: Some(TensorShape { dim: vec![Dim { size: 1 }] }),
                string_val: vec![text.as_bytes().to_vec()],
            }),
            metadata: Some(SummaryMetadata { plugin_data: Some(PluginData { plugin_name: "text".into() }) }),
            ..Default::default()
        };
        self.write(&Event {
            wall_time: now_s(),
            step,
            summary: Some(Summary { value: vec![value] }),
            ..Default::default()
        })
    }
}

/// The events of a file, checking every frame's CRCs (an independent reader for tests and `ferrotune`'s own
/// checks; TensorBoard is the reference reader).
pub fn read_events(path: &Path) -> Result<Vec<Event>, String> {
    let data = ferrotune_core::fsx::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = vec![];
    let mut at = 0usize;
    while at < data.len() {
        let bad = |what: &str| format!("{}: record at byte {at}: {what}", path.display());
        let head = data.get(at..at + 12).ok_or_else(|| bad("truncated header"))?;
        if u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) != masked_crc(&head[..8]) {
            return Err(bad("length CRC mismatch"));
        }
        let len = u64::from_le_bytes(head[..8].try_into().expect("8 bytes")) as usize;
        let body = data.get(at + 12..at + 12 + len).ok_or_else(|| bad("truncated data"))?;
        let crc = data.get(at + 12 + len..at + 16 + len).ok_or_else(|| bad("truncated data CRC"))?;
        if u32::from_le_bytes(crc.try_into().expect("4 bytes")) != masked_crc(body) {
            return Err(bad("data CRC mismatch"));
        }
        out.push(<Event as prost::Message>::decode(body).map_err(|e| bad(&e.to_string()))?);
        at += 16 + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_values() {
        // The standard check value of CRC-32C, and RFC 3720's test vectors (iSCSI).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
    }

    #[test]
    fn written_events_read_back_and_corruption_is_caught() {
        let d = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(d.path(), true).unwrap();
        w.text(0, "recipe", "model: x").unwrap();
        w.scalars(5, &[("loss".into(), 1.5), ("lr".into(), 2e-4), ("nan".into(), f64::NAN)]).unwrap();
        let path = w.path().to_path_buf();
        assert!(path.file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."));
        let ev = read_events(&path).unwrap();
        assert_eq!(ev[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(ev[1].summary.as_ref().unwrap().value[0].tensor.as_ref().unwrap().string_val[0], b"model: x");
        assert_eq!((ev[2].step, ev[2].session_log.as_ref().map(|s| s.status)), (5, Some(1)), "restart marker");
        let vals = &ev[3].summary.as_ref().unwrap().value;
        assert_eq!(vals.len(), 2, "the NaN is left out");
        assert_eq!((vals[0].tag.as_str(), vals[0].simple_value), ("loss", Some(1.5)));
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(read_events(&path).unwrap_err().contains("data CRC mismatch"));
    }
}
