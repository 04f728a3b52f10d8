//! SQL generated from the catalogue.
//!
//! - [`sqlite`] and [`postgres`]: the branch pull area (change log, ticks, metadata) and
//!   the capture triggers, plus the optional demo schema.
//! - [`hq`]: the HQ mirror tables `hq.<table>`, the views `hq.<table>_live` and the
//!   set-wise apply statement of each table.
//!
//! Identifiers come from a validated [`crate::Catalogue`] only and are always quoted.

pub mod hq;
pub mod postgres;
pub mod snapshot;
pub mod sqlite;

/// Version of the branch pull-area layout. Stored in the pull area's metadata; install
/// upgrades an older layout and refuses a newer one. 2: the file index (`_files`).
pub const PULL_AREA_VERSION: i64 = 2;

/// Quote an identifier (already validated by the catalogue) for SQLite and PostgreSQL.
pub fn q(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quote a string literal.
pub fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Demo schema: the catalogue's tables as a product-management application has them
/// (`products.sku` unique, the child tables referencing `products`), with the column
/// types of one branch backend.
pub fn demo_schema(
    catalogue: &crate::Catalogue,
    column_type: fn(&crate::ColumnType) -> String,
) -> Vec<String> {
    catalogue
        .tables
        .iter()
        .map(|t| {
            let mut cols: Vec<String> = t
                .columns
                .iter()
                .map(|c| {
                    let mut s = format!("{} {}", q(&c.name), column_type(&c.ty));
                    if !c.nullable {
                        s.push_str(" NOT NULL");
                    }
                    if t.name == "products" && c.name == "sku" {
                        s.push_str(" UNIQUE");
                    }
                    s
                })
                .collect();
            cols.push(format!(
                "PRIMARY KEY ({})",
                t.primary_key
                    .iter()
                    .map(|k| q(k))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            if matches!(
                t.name.as_str(),
                "inventory" | "product_images" | "stock_movements"
            ) {
                cols.push(
                    "FOREIGN KEY (\"product_id\") REFERENCES \"products\"(\"product_id\")".into(),
                );
            }
            format!(
                "CREATE TABLE IF NOT EXISTS {} ({})",
                q(&t.name),
                cols.join(", ")
            )
        })
        .collect()
}
