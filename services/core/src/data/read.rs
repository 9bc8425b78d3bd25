//! Reading raw records: JSON Lines (one object per line; blank lines skipped), a JSON array of objects,
//! CSV with a header row (every field a string), or Parquet (uncompressed, Snappy or gzip; nested list /
//! struct columns become JSON lists / objects). Each record keeps its 1-based location (line, element or
//! row) for errors.

use std::path::Path;

use crate::CoreError;
use serde_json::Value;

use crate::data::{DataError, Result};

/// One raw record and where it came from.
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// 1-based line (JSONL), element index (JSON) or row (CSV; the header is row 1).
    pub line: usize,
    /// The parsed object, or the parse error for this line.
    pub value: std::result::Result<Value, String>,
}

/// The default bound on one record's text, in bytes (`max_text_bytes`): a record past it is reported as
/// a bad record instead of being tokenized (tokenizing takes ~200 bytes of memory per byte of text).
pub const DEFAULT_MAX_TEXT_BYTES: usize = 1 << 20;

/// Bytes of text in a JSON value (its strings and keys; numbers count as 8).
fn value_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(value_bytes).sum(),
        Value::Object(o) => o.iter().map(|(k, v)| k.len() + value_bytes(v)).sum(),
        _ => 8,
    }
}

fn too_long(n: usize, max: usize) -> String {
    format!("record of {n} bytes is longer than the limit of {max} bytes (max_text_bytes)")
}

/// Keeps a parsed record within `max` bytes of text.
fn bounded(value: std::result::Result<Value, String>, max: usize) -> std::result::Result<Value, String> {
    value.and_then(|v| match value_bytes(&v) {
        n if n > max => Err(too_long(n, max)),
        _ => Ok(v),
    })
}

/// Reads every record of `path`, choosing the reader by extension (`.jsonl`, `.json`, `.csv`); a record
/// with more than `max_text_bytes` of text is a bad record (with its line).
pub fn read_records(path: &Path, max_text_bytes: usize) -> Result<Vec<RawRecord>> {
    let max = max_text_bytes;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let text = || crate::fsx::read_to_string(path).map_err(|e| DataError::Core(CoreError::io(path, e)));
    match ext.as_str() {
        "jsonl" | "ndjson" => Ok(text()?
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| RawRecord {
                line: i + 1,
                value: if l.len() > max {
                    Err(too_long(l.len(), max))
                } else {
                    serde_json::from_str(l).map_err(|e| format!("invalid JSON: {e}"))
                },
            })
            .collect()),
        "json" => {
            let v: Value = serde_json::from_str(&text()?)
                .map_err(|e| DataError::Core(CoreError::format(path, format!("invalid JSON: {e}"))))?;
            let arr = match v {
                Value::Array(a) => a,
                Value::Object(mut o) if o.get("data").is_some_and(Value::is_array) => match o.remove("data") {
                    Some(Value::Array(a)) => a,
                    _ => unreachable!("checked above"),
                },
                _ => {
                    return Err(DataError::Core(CoreError::format(
                        path,
                        "expected a JSON array of records (or {\"data\": [...]})",
                    )))
                }
            };
            Ok(arr
                .into_iter()
                .enumerate()
                .map(|(i, v)| RawRecord { line: i + 1, value: bounded(Ok(v), max) })
                .collect())
        }
        "csv" => {
            let file = crate::fsx::open(path).map_err(|e| DataError::Core(CoreError::io(path, e)))?;
            let mut rdr = csv::Reader::from_reader(std::io::BufReader::new(file));
            let headers = rdr.headers().map_err(|e| DataError::Core(CoreError::format(path, e.to_string())))?.clone();
            Ok(rdr
                .records()
                .enumerate()
                .map(|(i, r)| RawRecord {
                    line: i + 2,
                    value: r
                        .map_err(|e| format!("invalid CSV row: {e}"))
                        .and_then(|r| match r.as_slice().len() {
                            n if n > max => Err(too_long(n, max)),
                            _ => Ok(r),
                        })
                        .map(|r| {
                            Value::Object(
                                headers
                                    .iter()
                                    .zip(r.iter())
                                    .map(|(h, f)| (h.to_owned(), Value::String(f.to_owned())))
                                    .collect(),
                            )
                        }),
                })
                .collect())
        }
        // The Parquet reader is a dependency's: a panic it raises on a damaged file is that file's error.
        "parquet" => std::panic::catch_unwind(|| read_parquet(path, max)).unwrap_or_else(|_| {
            Err(DataError::Core(CoreError::format(path, "invalid Parquet file: the reader failed on it")))
        }),
        _ => Err(DataError::InvalidArgument(format!(
            "{}: unknown input type `.{ext}` (use .jsonl, .json, .csv or .parquet)",
            path.display()
        ))),
    }
}

fn read_parquet(path: &Path, max: usize) -> Result<Vec<RawRecord>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |e: parquet::errors::ParquetError| {
        DataError::Core(CoreError::format(path, format!("invalid Parquet file: {e}")))
    };
    let file = crate::fsx::open(path).map_err(|e| DataError::Core(CoreError::io(path, e)))?;
    let len = file.metadata().map_err(|e| DataError::Core(CoreError::io(path, e)))?.len() as i64;
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    // Column chunks must lie inside the file (the reader panics on some that do not).
    for (g, rg) in reader.metadata().row_groups().iter().enumerate() {
        for c in rg.columns() {
            let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
            let size = c.compressed_size();
            if start < 0 || size < 0 || start.checked_add(size).is_none_or(|end| end > len) || rg.num_rows() < 0 {
                return Err(DataError::Core(CoreError::format(
                    path,
                    format!("invalid Parquet file: row group {g}, column {}: bytes outside the file", c.column_path()),
                )));
            }
        }
    }
    let declared = usize::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0);
    let rows = reader.get_row_iter(None).map_err(bad)?;
    // The row iterator of a damaged file can yield the same error forever: stop at the first one, and
    // never read past the rows the footer declares.
    let mut out = vec![];
    for (i, r) in rows.take(declared).enumerate() {
        match r {
            Ok(row) => out.push(RawRecord { line: i + 1, value: bounded(Ok(row.to_json_value()), max) }),
            Err(e) => {
                out.push(RawRecord {
                    line: i + 1,
                    value: Err(format!("unreadable Parquet row (the rest of the file is skipped): {e}")),
                });
                break;
            }
        }
    }
    Ok(out)
}
