//! Conversion between SQLite values and weft's typed `Value`, exact in both directions.
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Row as _, Sqlite, TypeInfo as _, ValueRef as _};

use crate::event::Value;

/// Reads column `i` keeping its storage class.
pub fn value_at(row: &SqliteRow, i: usize) -> Result<Value, sqlx::Error> {
    let raw = row.try_get_raw(i)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let kind = raw.type_info().name().to_owned();
    Ok(match kind.as_str() {
        "INTEGER" => Value::Integer(row.try_get(i)?),
        "REAL" => Value::Real(row.try_get(i)?),
        "TEXT" => Value::Text(row.try_get(i)?),
        _ => Value::Blob(row.try_get(i)?),
    })
}

pub type Query<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments>;

pub fn bind<'q>(query: Query<'q>, value: &Value) -> Query<'q> {
    match value {
        Value::Null => query.bind(None::<i64>),
        Value::Integer(i) => query.bind(*i),
        Value::Real(f) => query.bind(*f),
        Value::Text(s) => query.bind(s.clone()),
        Value::Blob(b) => query.bind(b.clone()),
    }
}
