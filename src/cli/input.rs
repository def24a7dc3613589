//! What a person types, read as typed values: a primary key (`--key`) and a row (`--edit`).
use std::collections::BTreeMap;

use crate::event::{Key, Value};

/// A key typed by a person: a JSON value, or an array of them for a composite key; text that
/// is not JSON is taken as a string.
pub fn parse_key(text: &str, width: usize) -> anyhow::Result<Key> {
    let json: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_owned()));
    let items = match json {
        serde_json::Value::Array(items) => items,
        single => vec![single],
    };
    if items.len() != width {
        anyhow::bail!(
            "key {text} has {} values; the table's primary key has {width} columns",
            items.len()
        );
    }
    let values = items
        .iter()
        .map(|v| match v {
            serde_json::Value::Number(n) if n.is_i64() => Ok(Value::Integer(n.as_i64().expect("checked"))),
            serde_json::Value::Number(n) => Ok(Value::Real(n.as_f64().unwrap_or(0.0))),
            serde_json::Value::String(s) => Ok(Value::Text(s.clone())),
            other => Err(anyhow::anyhow!("{other} is not a key value")),
        })
        .collect::<Result<_, _>>()?;
    Ok(Key(values))
}

/// A row typed by a person (`--edit`): a JSON object of column values, `{"blob": "hex"}` for
/// bytes.
pub fn parse_row(text: &str, source: &str) -> anyhow::Result<Vec<(String, Value)>> {
    let object: BTreeMap<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| anyhow::anyhow!("{source}: expected a JSON object of column values ({e})"))?;
    object.into_iter().map(|(c, v)| Ok((c, json_value(&v)?))).collect()
}

fn json_value(value: &serde_json::Value) -> anyhow::Result<Value> {
    Ok(match value {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Integer(i64::from(*b)),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Real(n.as_f64().ok_or_else(|| anyhow::anyhow!("number out of range"))?),
        },
        serde_json::Value::String(s) => Value::Text(s.clone()),
        serde_json::Value::Object(o) if o.len() == 1 && o.contains_key("blob") => {
            let bad = || anyhow::anyhow!("blob must be a hex string");
            let hex = o["blob"].as_str().ok_or_else(bad)?;
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|_| bad())?;
            Value::Blob(bytes)
        }
        other => anyhow::bail!("{other} is not a column value; use a number, a string, null or {{\"blob\": \"hex\"}}"),
    })
}
