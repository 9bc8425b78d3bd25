//! A model's layers placed across the devices of one process (transformers' `device_map`), for a model that
//! does not fit one device: the embedding on the first, each decoder layer where the map says, the final
//! norm and the head on the last (a tied head stays with the embedding, whose matrix it is). The forward
//! pass moves the hidden states (and the rotary tables and masks) to each layer's device; gradients flow
//! back through the same moves. Pipeline stages run one after the other (no micro-batch pipelining), as
//! with transformers' `device_map`.
//!
//! The map is given as
//! - `auto` (or `balanced`): the layers split in contiguous, near-equal blocks over every visible CUDA
//!   device (transformers' `auto` balances by memory; with equal layers that is by count); one or no CUDA
//!   device: everything on the default device;
//! - a list of devices, e.g. `[cuda:0, cuda:1]`: the layers split in contiguous, near-equal blocks over them,
//!   in order;
//! - transformers' form, module name → device: `{model.embed_tokens: 0, model.layers.0: 0, …,
//!   model.norm: 1, lm_head: 1}` (an integer is a CUDA index; `cpu` and `cuda:N` are accepted; a key covers
//!   the modules under it, `""` all of them).

use tch::Device;

use crate::error::{CoreError, Result};

/// Where each part of a model lives.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// `model.embed_tokens` (and the rotary tables, which are computed with it).
    pub embed: Device,
    /// `model.layers.{i}`.
    pub layers: Vec<Device>,
    /// `model.norm`.
    pub norm: Device,
    /// `lm_head` (the embedding's device when tied).
    pub head: Device,
}

/// Checks a `device_map`'s form and that its devices exist here (before a job starts; which modules it
/// covers is checked with the model, by [`resolve`]).
pub fn check(spec: &serde_json::Value) -> Result<()> {
    check_with(spec, tch::Cuda::device_count() as usize)
}

/// [`check`] with `cuda` visible CUDA devices.
pub fn check_with(spec: &serde_json::Value, cuda: usize) -> Result<()> {
    use serde_json::Value;
    match spec {
        Value::String(s) if s == "auto" || s == "balanced" => Ok(()),
        Value::Array(items) if items.is_empty() => Err(bad("an empty list".into())),
        Value::Array(items) => items.iter().try_for_each(|v| device(v, cuda).map(drop)),
        Value::Object(map) => map.values().try_for_each(|v| device(v, cuda).map(drop)),
        _ => Err(bad(format!("{spec} (use auto, a list of devices, or module name → device)"))),
    }
}

/// Resolves a `device_map` for a model of `num_layers` layers; the CUDA devices are those libtorch sees.
pub fn resolve(spec: &serde_json::Value, num_layers: usize, tied: bool, default: Device) -> Result<Placement> {
    resolve_with(spec, num_layers, tied, default, tch::Cuda::device_count() as usize)
}

/// [`resolve`] with `cuda` visible CUDA devices.
pub fn resolve_with(
    spec: &serde_json::Value,
    num_layers: usize,
    tied: bool,
    default: Device,
    cuda: usize,
) -> Result<Placement> {
    use serde_json::Value;
    check_with(spec, cuda)?;
    let mut p = match spec {
        Value::String(s) if s == "auto" || s == "balanced" => {
            let devices: Vec<Device> = if cuda < 2 { vec![default] } else { (0..cuda).map(Device::Cuda).collect() };
            blocks(&devices, num_layers)
        }
        Value::Array(items) => {
            let devices = items.iter().map(|v| device(v, cuda)).collect::<Result<Vec<_>>>()?;
            if devices.len() > num_layers.max(1) {
                return Err(bad(format!("{} devices for {num_layers} layers", devices.len())));
            }
            blocks(&devices, num_layers)
        }
        Value::Object(map) => {
            let entries = map.iter().map(|(k, v)| Ok((k.as_str(), device(v, cuda)?))).collect::<Result<Vec<_>>>()?;
            let modules: Vec<String> = ["model.embed_tokens".to_owned()]
                .into_iter()
                .chain((0..num_layers).map(|i| format!("model.layers.{i}")))
                .chain(["model.norm".to_owned(), "lm_head".to_owned()])
                .collect();
            for (k, _) in &entries {
                if !k.is_empty() && !modules.iter().any(|m| covers(k, m)) {
                    return Err(bad(format!("key `{k}` names no module of this model")));
                }
            }
            let place = |m: &str| -> Result<Device> {
                entries
                    .iter()
                    .filter(|(k, _)| covers(k, m))
                    .max_by_key(|(k, _)| k.len())
                    .map(|&(_, d)| d)
                    .ok_or_else(|| bad(format!("no entry places `{m}`")))
            };
            Placement {
                embed: place("model.embed_tokens")?,
                layers: (0..num_layers).map(|i| place(&format!("model.layers.{i}"))).collect::<Result<_>>()?,
                norm: place("model.norm")?,
                // A tied head is the embedding's matrix: an entry for it may be left out.
                head: if tied { Device::Cpu } else { place("lm_head")? },
            }
        }
        _ => unreachable!("checked"),
    };
    if tied {
        p.head = p.embed;
    }
    Ok(p)
}

/// Whether map key `key` covers module `module` (equal, or a parent at a dot; `""` covers everything).
fn covers(key: &str, module: &str) -> bool {
    key.is_empty() || module == key || module.strip_prefix(key).is_some_and(|rest| rest.starts_with('.'))
}

/// The layers in contiguous near-equal blocks over `devices` (the first blocks one larger when they do not
/// divide); the embedding on the first device, the norm and the head on the last.
fn blocks(devices: &[Device], num_layers: usize) -> Placement {
    let n = devices.len();
    let (per, extra) = (num_layers / n, num_layers % n);
    let layers =
        devices.iter().enumerate().flat_map(|(i, &d)| std::iter::repeat_n(d, per + usize::from(i < extra))).collect();
    Placement { embed: devices[0], layers, norm: devices[n - 1], head: devices[n - 1] }
}

/// A map value: an integer CUDA index, `cpu`, `cuda` or `cuda:N`.
fn device(v: &serde_json::Value, cuda: usize) -> Result<Device> {
    let name = match v {
        serde_json::Value::Number(n) => format!("cuda:{n}"),
        serde_json::Value::String(s) if s == "disk" => {
            return Err(bad("`disk` offload is not supported (place every module on a device)".into()));
        }
        serde_json::Value::String(s) => s.clone(),
        other => return Err(bad(format!("device {other} (use an index, cpu or cuda:N)"))),
    };
    super::parse_device_with(&name, cuda).map_err(|e| bad(e.to_string()))
}

fn bad(what: String) -> CoreError {
    CoreError::InvalidArgument(format!("device_map: {what}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const C0: Device = Device::Cuda(0);
    const C1: Device = Device::Cuda(1);

    #[test]
    fn auto_and_lists_split_the_layers_in_contiguous_blocks() {
        let p = resolve_with(&json!("auto"), 5, false, Device::Cpu, 2).unwrap();
        assert_eq!(p, Placement { embed: C0, layers: vec![C0, C0, C0, C1, C1], norm: C1, head: C1 });
        // One visible GPU (or none): everything on the default device.
        let p = resolve_with(&json!("auto"), 3, false, C0, 1).unwrap();
        assert_eq!(p.layers, vec![C0; 3]);
        let p = resolve_with(&json!(["cuda:1", 0, "cpu"]), 4, true, Device::Cpu, 2).unwrap();
        assert_eq!(p.layers, vec![C1, C1, C0, Device::Cpu]);
        // Tied: the head is the embedding.
        assert_eq!((p.embed, p.norm, p.head), (C1, Device::Cpu, C1));
    }

    #[test]
    fn transformers_form_takes_the_longest_covering_key() {
        let spec =
            json!({"model": 0, "model.layers.2": 1, "model.layers.3": "cuda:1", "model.norm": 1, "lm_head": "cpu"});
        let p = resolve_with(&spec, 4, false, Device::Cpu, 2).unwrap();
        assert_eq!(p, Placement { embed: C0, layers: vec![C0, C0, C1, C1], norm: C1, head: Device::Cpu });
        // `model.layers.1` must not cover `model.layers.10`.
        let spec = json!({"": 0, "model.layers.1": 1});
        let p = resolve_with(&spec, 11, false, Device::Cpu, 2).unwrap();
        assert_eq!(p.layers.iter().filter(|&&d| d == C1).count(), 1);
    }

    #[test]
    fn bad_maps_say_what_is_wrong() {
        let err = |spec: serde_json::Value| resolve_with(&spec, 4, false, Device::Cpu, 2).unwrap_err().to_string();
        assert!(err(json!({"model.embed_tokens": 0, "model.layers": 0, "model.norm": 0}))
            .contains("no entry places `lm_head`"));
        assert!(err(json!({"": 0, "model.layer.0": 1})).contains("key `model.layer.0` names no module"));
        assert!(err(json!({"": "disk"})).contains("disk"));
        assert!(err(json!(["cuda:2"])).contains("cuda:2"));
        assert!(err(json!("sequential_by_memory")).contains("use auto"));
        assert!(check_with(&json!({"": 0, "lm_head": "cuda:1"}), 1).unwrap_err().to_string().contains("cuda:1"));
        assert!(check_with(&json!({"": 0, "lm_head": "cuda:1"}), 2).is_ok());
        assert!(err(json!([0, 1, 0, 1, 0])).contains("5 devices for 4 layers"));
        assert!(err(json!([])).contains("empty"));
    }
}
