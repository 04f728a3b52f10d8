//! The sqlx migrations of the HQ `sync` schema (`schemas/migrations/`). The typed
//! mirror tables are generated from the catalogue instead ([`crate::sql::hq`]).

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
