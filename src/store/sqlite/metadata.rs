//! The shared metadata statements (`store::metadata`) in SQLite's names.
crate::store::metadata::metadata_io!(
    sqlx::Sqlite,
    sqlx::SqliteConnection,
    "_weft_",
    super::schema::NOW_MICROS
);
