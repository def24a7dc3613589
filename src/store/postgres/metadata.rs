//! The shared metadata statements (`store::metadata`) in PostgreSQL's names.
crate::store::metadata::metadata_io!(sqlx::Postgres, sqlx::PgConnection, "weft.", "weft.now_micros()");
