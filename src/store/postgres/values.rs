//! Conversion between PostgreSQL columns and weft's typed `Value`, exact in both directions.
//!
//! Reading: integers (int2/4/8) become `Integer`, floats (float4/8) `Real`, bytea `Blob`,
//! booleans `Integer` 0/1 (as SQLite applications store them), and every other type (numeric,
//! text, timestamps, dates, JSON, UUID, enums, arrays...) its canonical text output, read
//! with `TimeZone = UTC`, `DateStyle = ISO` and shortest-exact floats. Writing: each value is
//! bound as text and cast to the column's declared type, so PostgreSQL's own input functions
//! parse it; a value the column cannot hold fails the cast and is dead-lettered with
//! PostgreSQL's message. Bytes go only into bytea, and bytea takes only bytes.
use sqlx::postgres::PgRow;
use sqlx::{Row as _, ValueRef as _};

use crate::event::Value;

/// How a column's values are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Float,
    Bool,
    Bytes,
    Text,
}

impl Kind {
    pub fn of(type_name: &str) -> Self {
        match type_name {
            "int2" | "int4" | "int8" => Kind::Int,
            "float4" | "float8" => Kind::Float,
            "bool" => Kind::Bool,
            "bytea" => Kind::Bytes,
            _ => Kind::Text,
        }
    }

    /// The SELECT expression reading `column` (already qualified and quoted) as this kind.
    pub fn select(self, column: &str) -> String {
        match self {
            Kind::Int => format!("{column}::int8"),
            Kind::Float => format!("{column}::float8"),
            Kind::Bool => format!("{column}::int4::int8"),
            Kind::Bytes => column.to_owned(),
            Kind::Text => format!("{column}::text"),
        }
    }

    /// Reads column `i` of a row selected with `select`.
    pub fn read(self, row: &PgRow, i: usize) -> Result<Value, sqlx::Error> {
        if row.try_get_raw(i)?.is_null() {
            return Ok(Value::Null);
        }
        Ok(match self {
            Kind::Int | Kind::Bool => Value::Integer(row.try_get(i)?),
            Kind::Float => Value::Real(row.try_get(i)?),
            Kind::Bytes => Value::Blob(row.try_get(i)?),
            Kind::Text => Value::Text(row.try_get(i)?),
        })
    }

    /// The text a value is bound as, to be cast to a column of this kind; `Err` says why the
    /// column cannot hold it.
    pub fn text(self, value: &Value) -> Result<Option<String>, String> {
        Ok(Some(match (self, value) {
            (_, Value::Null) => return Ok(None),
            (Kind::Bytes, Value::Blob(bytes)) => {
                let mut out = String::with_capacity(2 + 2 * bytes.len());
                out.push_str("\\x");
                for b in bytes {
                    out.push_str(&format!("{b:02x}"));
                }
                out
            }
            (Kind::Bytes, other) => return Err(format!("a bytea column cannot hold {}", describe(other))),
            (_, Value::Blob(_)) => return Err("only a bytea column can hold bytes".into()),
            (_, Value::Integer(i)) => i.to_string(),
            // `{:e}` is the shortest text that reads back as the same double.
            (_, Value::Real(f)) => format!("{f:e}"),
            (_, Value::Text(s)) => s.clone(),
        }))
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "NULL",
        Value::Integer(_) => "an integer",
        Value::Real(_) => "a float",
        Value::Text(_) => "text",
        Value::Blob(_) => "bytes",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_become_text_postgres_reads_back_exactly() {
        assert_eq!(Kind::Float.text(&Value::Real(0.1)).unwrap().unwrap(), "1e-1");
        assert_eq!(Kind::Float.text(&Value::Real(1e300)).unwrap().unwrap(), "1e300");
        assert_eq!(Kind::Float.text(&Value::Real(f64::NAN)).unwrap().unwrap(), "NaN");
        assert_eq!(
            Kind::Float.text(&Value::Real(f64::NEG_INFINITY)).unwrap().unwrap(),
            "-inf"
        );
        assert_eq!(
            Kind::Bytes.text(&Value::Blob(vec![0, 255, 16])).unwrap().unwrap(),
            "\\x00ff10"
        );
        assert_eq!(Kind::Int.text(&Value::Null).unwrap(), None);
        assert!(Kind::Text.text(&Value::Blob(vec![1])).is_err());
        assert!(Kind::Bytes.text(&Value::Text("x".into())).is_err());
        for f in [0.1, 1.0 / 3.0, 123456.789e-300, f64::MAX, f64::MIN_POSITIVE, -0.0] {
            let text = Kind::Float.text(&Value::Real(f)).unwrap().unwrap();
            assert_eq!(text.parse::<f64>().unwrap().to_bits(), f.to_bits(), "{text}");
        }
    }
}
