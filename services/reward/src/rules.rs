//! Verifiable rewards: rules RewardService scores without a model. Besides the text rules (`regex:`,
//! `exact:`, `prefix:`, `length`), the answer rules compare an answer extracted from the response with the
//! item's `reference` (a field of the prompt record, sent by the orchestrator):
//!
//! - `answer:exact` — the trimmed response equals the reference;
//! - `answer:contains` — the response contains the reference (case-insensitive);
//! - `answer:last_number` — the last number in the response (thousands separators dropped) equals the
//!   reference as a number;
//! - `answer:boxed` — the content of the last `\boxed{…}` (braces balanced) equals the reference;
//! - `answer:json:FIELD` — the response is a JSON object whose FIELD (a string, or a number or boolean as
//!   written) equals the reference;
//!
//! and the structure rules `json` (the trimmed response is JSON) and `json_schema:SCHEMA` (it is JSON valid
//! under SCHEMA: `type`, `properties`, `required`, `items`, `enum`). Each scores 1 or 0 (`length`: the
//! character count). A rule that cannot be read is INVALID_ARGUMENT naming it.

use serde_json::Value;
use tonic::Status;

/// The score of `response` (with the item's `reference`, for answer rules) under `rule`.
pub fn rule_score(rule: &str, response: &str, reference: &str) -> Result<f32, Status> {
    let hit = |b: bool| Ok(f32::from(u8::from(b)));
    if rule == "length" {
        return Ok(response.chars().count() as f32);
    }
    if rule == "json" {
        return hit(serde_json::from_str::<Value>(response.trim()).is_ok());
    }
    if let Some(schema) = rule.strip_prefix("json_schema:") {
        let schema: Value = serde_json::from_str(schema)
            .map_err(|e| Status::invalid_argument(format!("model.rule json_schema: not JSON: {e}")))?;
        check_schema(&schema).map_err(|e| Status::invalid_argument(format!("model.rule json_schema: {e}")))?;
        return hit(serde_json::from_str::<Value>(response.trim()).is_ok_and(|v| valid(&v, &schema)));
    }
    if let Some(how) = rule.strip_prefix("answer:") {
        if reference.is_empty() {
            return Err(Status::invalid_argument(format!(
                "model.rule `{rule}`: the item has no reference answer (set the reward function's reference_field)"
            )));
        }
        let reference = reference.trim();
        return match how {
            "exact" => hit(response.trim() == reference),
            "contains" => hit(response.to_lowercase().contains(&reference.to_lowercase())),
            "last_number" => {
                let want: f64 = parse_number(reference).ok_or_else(|| {
                    Status::invalid_argument(format!("model.rule `{rule}`: the reference `{reference}` is not a number"))
                })?;
                hit(last_number(response).is_some_and(|x| (x - want).abs() <= 1e-9 * want.abs().max(1.0)))
            }
            "boxed" => hit(last_boxed(response).is_some_and(|b| b.trim() == reference)),
            _ => match how.strip_prefix("json:") {
                Some(field) if !field.is_empty() => hit(json_field(response, field).is_some_and(|v| v == reference)),
                _ => Err(Status::invalid_argument(format!(
                    "model.rule `{rule}`: use answer:exact, answer:contains, answer:last_number, answer:boxed or answer:json:FIELD"
                ))),
            },
        };
    }
    if let Some(t) = rule.strip_prefix("exact:") {
        return hit(response.trim() == t);
    }
    if let Some(t) = rule.strip_prefix("prefix:") {
        return hit(response.trim_start().starts_with(t));
    }
    if let Some(p) = rule.strip_prefix("regex:") {
        return crate::scorer::regex_search(p, response).map(|m| f32::from(u8::from(m)));
    }
    Err(Status::invalid_argument(format!(
        "model.rule `{rule}`: use regex:PATTERN, exact:TEXT, prefix:TEXT, length, json, json_schema:SCHEMA or answer:…"
    )))
}

fn parse_number(s: &str) -> Option<f64> {
    s.trim().replace(',', "").parse().ok()
}

/// The last number in `text` (`-12`, `3.5`, `1,234`).
fn last_number(text: &str) -> Option<f64> {
    let b = text.as_bytes();
    let mut end = b.len();
    while end > 0 {
        // The last digit, then back over digits, separators and a decimal point.
        let last = b[..end].iter().rposition(u8::is_ascii_digit)?;
        let mut start = last;
        while start > 0 && (b[start - 1].is_ascii_digit() || matches!(b[start - 1], b'.' | b',')) {
            start -= 1;
        }
        while start < last && matches!(b[start], b'.' | b',') {
            start += 1;
        }
        let neg = start > 0 && b[start - 1] == b'-';
        let s = &text[start..=last];
        if let Some(x) = parse_number(s) {
            return Some(if neg { -x } else { x });
        }
        end = start;
    }
    None
}

/// The content of the last `\boxed{…}`.
fn last_boxed(text: &str) -> Option<&str> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[start..start + i]);
                }
            }
            _ => {}
        }
    }
    None
}

fn json_field(text: &str, field: &str) -> Option<String> {
    let v: Value = serde_json::from_str(text.trim()).ok()?;
    match v.get(field)? {
        Value::String(s) => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Checks that a schema uses only what [`valid`] understands.
fn check_schema(s: &Value) -> Result<(), String> {
    let Value::Object(m) = s else { return Err("a schema is an object".into()) };
    for (k, v) in m {
        match k.as_str() {
            "type" => {
                let ok = ["object", "array", "string", "number", "integer", "boolean", "null"];
                if !v.as_str().is_some_and(|t| ok.contains(&t)) {
                    return Err(format!("type {v}: one of {}", ok.join(", ")));
                }
            }
            "properties" => {
                for p in v.as_object().ok_or("properties: an object")?.values() {
                    check_schema(p)?;
                }
            }
            "items" => check_schema(v)?,
            "required" => {
                if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
                    return Err("required: a list of names".into());
                }
            }
            "enum" => {
                v.as_array().ok_or("enum: a list")?;
            }
            "description" | "title" => {}
            other => return Err(format!("`{other}` is not supported (type, properties, required, items, enum)")),
        }
    }
    Ok(())
}

/// Whether `v` is valid under the (checked) schema `s`.
fn valid(v: &Value, s: &Value) -> bool {
    if let Some(t) = s.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "number" => v.is_number(),
            "integer" => v.is_i64() || v.is_u64(),
            "boolean" => v.is_boolean(),
            _ => v.is_null(),
        };
        if !ok {
            return false;
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return false;
        }
    }
    if let (Some(req), Some(obj)) = (s.get("required").and_then(Value::as_array), v.as_object()) {
        if !req.iter().filter_map(Value::as_str).all(|k| obj.contains_key(k)) {
            return false;
        }
    }
    if let (Some(props), Some(obj)) = (s.get("properties").and_then(Value::as_object), v.as_object()) {
        if !props.iter().all(|(k, ps)| obj.get(k).is_none_or(|x| valid(x, ps))) {
            return false;
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
        if !arr.iter().all(|x| valid(x, items)) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(rule: &str, resp: &str, reference: &str) -> f32 {
        rule_score(rule, resp, reference).unwrap()
    }

    #[test]
    fn answer_rules() {
        assert_eq!(score("answer:exact", " Paris ", "Paris"), 1.0);
        assert_eq!(score("answer:exact", "Paris.", "Paris"), 0.0);
        assert_eq!(score("answer:contains", "The capital of France is PARIS.", "Paris"), 1.0);
        assert_eq!(score("answer:contains", "It is Lyon.", "Paris"), 0.0);
        assert_eq!(score("answer:last_number", "3 apples and 4 pears make 7.", "7"), 1.0);
        assert_eq!(score("answer:last_number", "7 is wrong, it is 1,234.", "1234"), 1.0);
        assert_eq!(score("answer:last_number", "so x = -2.5", "-2.5"), 1.0);
        assert_eq!(score("answer:last_number", "it is 12.", "21"), 0.0);
        assert_eq!(score("answer:last_number", "no digits", "1"), 0.0);
        assert_eq!(score("answer:boxed", "so \\boxed{3} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), 1.0);
        assert_eq!(score("answer:boxed", "\\boxed{3", "3"), 0.0);
        assert_eq!(score("answer:json:city", r#"{"city": " Rome ", "n": 1}"#, "Rome"), 1.0);
        assert_eq!(score("answer:json:n", r#"{"city": "Rome", "n": 1}"#, "1"), 1.0);
        assert_eq!(score("answer:json:city", "Rome", "Rome"), 0.0);
        // An answer rule without a reference, or a reference that is not a number, is an error.
        assert!(rule_score("answer:exact", "x", "").is_err());
        assert!(rule_score("answer:last_number", "1", "one").is_err());
        assert!(rule_score("answer:magic", "1", "1").unwrap_err().message().contains("answer:magic"));
    }

    #[test]
    fn structure_rules() {
        assert_eq!(score("json", r#" {"a": [1, 2]} "#, ""), 1.0);
        assert_eq!(score("json", "{a: 1}", ""), 0.0);
        let schema = r#"json_schema:{"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}, "pop": {"type": "integer"}, "kind": {"enum": ["capital", "town"]}}}"#;
        assert_eq!(score(schema, r#"{"city": "Rome", "pop": 2800000, "kind": "capital"}"#, ""), 1.0);
        assert_eq!(score(schema, r#"{"pop": 1}"#, ""), 0.0, "required");
        assert_eq!(score(schema, r#"{"city": 3}"#, ""), 0.0, "property type");
        assert_eq!(score(schema, r#"{"city": "Rome", "pop": 2.5}"#, ""), 0.0, "integer");
        assert_eq!(score(schema, r#"{"city": "Rome", "kind": "village"}"#, ""), 0.0, "enum");
        assert_eq!(score(r#"json_schema:{"type": "array", "items": {"type": "number"}}"#, "[1, 2.5]", ""), 1.0);
        for bad in ["json_schema:{", r#"json_schema:{"type": "thing"}"#, r#"json_schema:{"pattern": "x"}"#] {
            assert_eq!(rule_score(bad, "{}", "").unwrap_err().code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }
}
