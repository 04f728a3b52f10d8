//! The catalogue of replicated tables.
//!
//! Both sides derive everything from it: the branch triggers (which columns go into a
//! row image), the HQ mirror tables (typed columns) and the apply statements. Table and
//! column names on the wire are only ever *looked up* here, never interpolated into SQL.
//!
//! The default catalogue is the product-management schema (`products`, `inventory`,
//! `product_images`, `stock_movements`). More tables come from a catalogue file:
//!
//! ```toml
//! [[tables]]
//! name = "suppliers"
//! primary_key = ["supplier_id"]
//! columns = [
//!   { name = "supplier_id", type = "integer", nullable = false },
//!   { name = "name", type = "text", nullable = false },
//!   { name = "rating", type = "numeric(3,1)" },
//! ]
//! ```

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Errors found while loading or validating a catalogue.
#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error("catalogue: invalid identifier {0:?} (use lowercase letters, digits and '_', starting with a letter, at most 48 characters)")]
    BadIdentifier(String),
    #[error("catalogue: unknown column type {0:?} (expected integer, text, numeric(P,S), timestamp, boolean, real or blob)")]
    BadType(String),
    #[error("catalogue: table {0:?} is defined twice")]
    DuplicateTable(String),
    #[error("catalogue: table {table:?} has column {column:?} twice")]
    DuplicateColumn { table: String, column: String },
    #[error("catalogue: table {0:?} has no primary key")]
    NoPrimaryKey(String),
    #[error("catalogue: table {table:?}: primary key column {column:?} is not one of its columns")]
    UnknownKeyColumn { table: String, column: String },
    #[error("catalogue: table {0:?} has no columns")]
    NoColumns(String),
    #[error("catalogue: table name {0:?} is reserved")]
    Reserved(String),
    #[error(
        "catalogue: table {table:?}: file_column {column:?} must name one of its text columns"
    )]
    BadFileColumn { table: String, column: String },
    #[error("catalogue file {path}: {message}")]
    File { path: String, message: String },
}

/// Column types understood on both sides. The branch representation and the HQ type of
/// each are fixed here, so a value either round-trips exactly or fails loudly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// 64-bit integer (SQLite INTEGER, PostgreSQL bigint at HQ).
    Integer,
    Text,
    /// Exact decimal; travels as a JSON number and is parsed by PostgreSQL as `numeric`,
    /// never through a float.
    Numeric {
        precision: u8,
        scale: u8,
    },
    /// Branch-local time without zone on SQLite (the branch config names the zone),
    /// `timestamptz` on PostgreSQL branches; `timestamptz` at HQ.
    Timestamp,
    Boolean,
    /// Double precision float.
    Real,
    /// Binary; travels hex-encoded (SQLite has no base64 function).
    Blob,
}

impl ColumnType {
    /// The type of the column in the HQ mirror table.
    pub fn hq_type(&self) -> String {
        match self {
            ColumnType::Integer => "bigint".into(),
            ColumnType::Text => "text".into(),
            ColumnType::Numeric { precision, scale } => format!("numeric({precision},{scale})"),
            ColumnType::Timestamp => "timestamptz".into(),
            ColumnType::Boolean => "boolean".into(),
            ColumnType::Real => "double precision".into(),
            ColumnType::Blob => "bytea".into(),
        }
    }

    /// The type used when decoding the JSON image at HQ (`json_to_recordset`). Numeric
    /// decodes unconstrained so that a value with too many digits is caught by the
    /// apply's precision check instead of being rounded; blobs decode as hex text.
    pub fn hq_decode_type(&self) -> &'static str {
        match self {
            ColumnType::Integer => "bigint",
            ColumnType::Text => "text",
            ColumnType::Numeric { .. } => "numeric",
            ColumnType::Timestamp => "timestamptz",
            ColumnType::Boolean => "boolean",
            ColumnType::Real => "double precision",
            ColumnType::Blob => "text",
        }
    }

    /// Declared type in the demo schema on a SQLite branch.
    pub fn sqlite_type(&self) -> String {
        match self {
            ColumnType::Integer => "INTEGER".into(),
            ColumnType::Text => "TEXT".into(),
            ColumnType::Numeric { precision, scale } => format!("NUMERIC({precision},{scale})"),
            ColumnType::Timestamp => "TIMESTAMP".into(),
            ColumnType::Boolean => "BOOLEAN".into(),
            ColumnType::Real => "REAL".into(),
            ColumnType::Blob => "BLOB".into(),
        }
    }

    /// Declared type in the demo schema on a PostgreSQL branch.
    pub fn postgres_type(&self) -> String {
        match self {
            ColumnType::Integer => "bigint".into(),
            ColumnType::Text => "text".into(),
            ColumnType::Numeric { precision, scale } => format!("numeric({precision},{scale})"),
            ColumnType::Timestamp => "timestamptz".into(),
            ColumnType::Boolean => "boolean".into(),
            ColumnType::Real => "double precision".into(),
            ColumnType::Blob => "bytea".into(),
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnType::Integer => f.write_str("integer"),
            ColumnType::Text => f.write_str("text"),
            ColumnType::Numeric { precision, scale } => write!(f, "numeric({precision},{scale})"),
            ColumnType::Timestamp => f.write_str("timestamp"),
            ColumnType::Boolean => f.write_str("boolean"),
            ColumnType::Real => f.write_str("real"),
            ColumnType::Blob => f.write_str("blob"),
        }
    }
}

impl FromStr for ColumnType {
    type Err = CatalogueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        let bad = || CatalogueError::BadType(s.to_string());
        Ok(match t.as_str() {
            "integer" | "int" | "bigint" => ColumnType::Integer,
            "text" => ColumnType::Text,
            "timestamp" | "timestamptz" => ColumnType::Timestamp,
            "boolean" | "bool" => ColumnType::Boolean,
            "real" | "double" => ColumnType::Real,
            "blob" | "bytea" => ColumnType::Blob,
            _ => {
                let inner = t
                    .strip_prefix("numeric(")
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(bad)?;
                let (p, s) = inner.split_once(',').ok_or_else(bad)?;
                let precision: u8 = p.trim().parse().map_err(|_| bad())?;
                let scale: u8 = s.trim().parse().map_err(|_| bad())?;
                if precision == 0 || precision > 38 || scale > precision {
                    return Err(bad());
                }
                ColumnType::Numeric { precision, scale }
            }
        })
    }
}

impl Serialize for ColumnType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ColumnType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: ColumnType,
    /// Only used for the demo schema's DDL; HQ mirror columns are nullable (tombstones).
    #[serde(default = "default_true")]
    pub nullable: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    pub name: String,
    pub primary_key: Vec<String>,
    pub columns: Vec<Column>,
    /// A text column naming a file (a path relative to the branch's `files_dir`): HQ's
    /// `_live` view shows a row only once that file is stored at HQ for its location.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_column: Option<String>,
}

impl Table {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn is_key(&self, name: &str) -> bool {
        self.primary_key.iter().any(|k| k == name)
    }

    /// Columns in declaration order, key columns included.
    pub fn column_names(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|c| c.name.as_str())
    }

    /// Non-key columns.
    pub fn value_columns(&self) -> impl Iterator<Item = &Column> {
        self.columns.iter().filter(|c| !self.is_key(&c.name))
    }
}

/// The set of replicated tables, in apply order (parents before children).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    pub tables: Vec<Table>,
}

/// Identifiers are restricted so that generated SQL never needs escaping beyond quoting,
/// and so that generated names (`_pull_<table>_ins`) stay within PostgreSQL's 63 bytes.
pub fn valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && s.len() <= 48
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn col(name: &str, ty: &str, nullable: bool) -> Column {
    Column {
        name: name.into(),
        ty: ty.parse().expect("built-in type"),
        nullable,
    }
}

impl Catalogue {
    /// The built-in product-management catalogue.
    pub fn product_management() -> Catalogue {
        Catalogue {
            tables: vec![
                Table {
                    name: "products".into(),
                    primary_key: vec!["product_id".into()],
                    columns: vec![
                        col("product_id", "integer", false),
                        col("sku", "text", false),
                        col("name", "text", false),
                        col("description", "text", true),
                        col("category", "text", true),
                        col("unit_price", "numeric(12,2)", false),
                        col("currency", "text", false),
                        col("updated_at", "timestamp", true),
                    ],
                    file_column: None,
                },
                Table {
                    name: "inventory".into(),
                    primary_key: vec!["product_id".into()],
                    columns: vec![
                        col("product_id", "integer", false),
                        col("quantity_on_hand", "integer", false),
                        col("reorder_level", "integer", true),
                        col("updated_at", "timestamp", true),
                    ],
                    file_column: None,
                },
                Table {
                    name: "product_images".into(),
                    primary_key: vec!["image_id".into()],
                    columns: vec![
                        col("image_id", "integer", false),
                        col("product_id", "integer", true),
                        col("file_path", "text", false),
                        col("sha256", "text", true),
                        col("updated_at", "timestamp", true),
                    ],
                    file_column: Some("file_path".into()),
                },
                Table {
                    name: "stock_movements".into(),
                    primary_key: vec!["movement_id".into()],
                    columns: vec![
                        col("movement_id", "integer", false),
                        col("product_id", "integer", false),
                        col("quantity_delta", "integer", false),
                        col("reason", "text", false),
                        col("moved_at", "timestamp", false),
                    ],
                    file_column: None,
                },
            ],
        }
    }

    /// The built-in catalogue plus the tables of an optional catalogue file.
    pub fn load(extra_tables_file: Option<&std::path::Path>) -> Result<Catalogue, CatalogueError> {
        let mut cat = Catalogue::product_management();
        if let Some(path) = extra_tables_file {
            let file_err = |message: String| CatalogueError::File {
                path: path.display().to_string(),
                message,
            };
            let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
            let extra: Catalogue = toml::from_str(&text).map_err(|e| file_err(e.to_string()))?;
            cat.tables.extend(extra.tables);
        }
        cat.validate()?;
        Ok(cat)
    }

    pub fn validate(&self) -> Result<(), CatalogueError> {
        let mut seen = std::collections::HashSet::new();
        for t in &self.tables {
            if !valid_identifier(&t.name) {
                return Err(CatalogueError::BadIdentifier(t.name.clone()));
            }
            if t.name.starts_with("pull") || t.name.starts_with('_') {
                return Err(CatalogueError::Reserved(t.name.clone()));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(CatalogueError::DuplicateTable(t.name.clone()));
            }
            if t.columns.is_empty() {
                return Err(CatalogueError::NoColumns(t.name.clone()));
            }
            let mut cols = std::collections::HashSet::new();
            for c in &t.columns {
                if !valid_identifier(&c.name) || c.name.starts_with('_') {
                    return Err(CatalogueError::BadIdentifier(c.name.clone()));
                }
                if c.name == "location_id" {
                    return Err(CatalogueError::Reserved(format!("{}.location_id", t.name)));
                }
                if !cols.insert(c.name.as_str()) {
                    return Err(CatalogueError::DuplicateColumn {
                        table: t.name.clone(),
                        column: c.name.clone(),
                    });
                }
            }
            if t.primary_key.is_empty() {
                return Err(CatalogueError::NoPrimaryKey(t.name.clone()));
            }
            if let Some(fc) = &t.file_column {
                if t.column(fc).map(|c| c.ty) != Some(ColumnType::Text) {
                    return Err(CatalogueError::BadFileColumn {
                        table: t.name.clone(),
                        column: fc.clone(),
                    });
                }
            }
            for k in &t.primary_key {
                if t.column(k).is_none() {
                    return Err(CatalogueError::UnknownKeyColumn {
                        table: t.name.clone(),
                        column: k.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// A stable fingerprint of the catalogue: install records it, so re-running install
    /// with the same catalogue is a no-op and a changed catalogue re-creates the triggers.
    pub fn fingerprint(&self) -> String {
        // FNV-1a over the canonical JSON: stable across releases and platforms.
        let json = serde_json::to_string(self).expect("catalogue serializes");
        let mut h: u64 = 0xcbf29ce484222325;
        for b in json.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
        format!("{h:016x}")
    }
}

/// The built-in table of the branch's file index (SQLite `_pull_files`, PostgreSQL
/// `pull.files`): its capture triggers write file events under the reserved wire name
/// [`crate::files::FILES_TABLE`]. It is not part of any [`Catalogue`] (the name is
/// reserved there), so HQ never makes a mirror table of it.
pub fn files_table() -> Table {
    Table {
        name: crate::files::FILES_TABLE.into(),
        primary_key: vec!["path".into()],
        columns: vec![
            col("path", "text", false),
            col("size", "integer", false),
            col("sha256", "text", false),
            col("mtime", "timestamp", false),
        ],
        file_column: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_catalogue_is_valid() {
        let c = Catalogue::product_management();
        c.validate().unwrap();
        assert_eq!(c.table("products").unwrap().primary_key, vec!["product_id"]);
    }

    #[test]
    fn column_types_parse_and_print() {
        for s in [
            "integer",
            "text",
            "numeric(12,2)",
            "timestamp",
            "boolean",
            "real",
            "blob",
        ] {
            let t: ColumnType = s.parse().unwrap();
            assert_eq!(t.to_string(), s);
        }
        assert!("numeric(2,3)".parse::<ColumnType>().is_err());
        assert!("varchar".parse::<ColumnType>().is_err());
    }

    #[test]
    fn identifiers_that_look_like_sql_are_refused() {
        assert!(valid_identifier("products"));
        assert!(!valid_identifier("products; drop table x"));
        assert!(!valid_identifier("Products"));
        assert!(!valid_identifier("\"x\""));
        assert!(!valid_identifier(""));
    }

    #[test]
    fn extra_tables_file_with_composite_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("extra.toml");
        std::fs::write(
            &p,
            r#"
[[tables]]
name = "price_lists"
primary_key = ["list_id", "product_id"]
columns = [
  { name = "list_id", type = "integer", nullable = false },
  { name = "product_id", type = "integer", nullable = false },
  { name = "price", type = "numeric(12,2)" },
]
"#,
        )
        .unwrap();
        let c = Catalogue::load(Some(&p)).unwrap();
        assert_eq!(c.table("price_lists").unwrap().primary_key.len(), 2);
    }

    #[test]
    fn bad_catalogues_are_refused_with_the_name() {
        let mut c = Catalogue::product_management();
        c.tables[0].primary_key = vec!["nope".into()];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        let mut c = Catalogue::product_management();
        c.tables.push(c.tables[0].clone());
        assert!(matches!(
            c.validate(),
            Err(CatalogueError::DuplicateTable(_))
        ));
    }

    #[test]
    fn file_column_must_be_a_text_column() {
        let c = Catalogue::product_management();
        assert_eq!(
            c.table("product_images").unwrap().file_column.as_deref(),
            Some("file_path")
        );
        let mut c2 = c.clone();
        c2.tables[2].file_column = Some("image_id".into());
        assert!(matches!(
            c2.validate(),
            Err(CatalogueError::BadFileColumn { .. })
        ));
        c2.tables[2].file_column = Some("nope".into());
        assert!(c2.validate().unwrap_err().to_string().contains("nope"));
        let t: Table = toml::from_str(
            "name = \"docs\"\nprimary_key = [\"id\"]\nfile_column = \"file\"\ncolumns = [{ name = \"id\", type = \"integer\" }, { name = \"file\", type = \"text\" }]\n",
        )
        .unwrap();
        assert_eq!(t.file_column.as_deref(), Some("file"));
        assert_eq!(files_table().name, "_files");
    }

    #[test]
    fn fingerprint_changes_with_the_catalogue() {
        let a = Catalogue::product_management();
        let mut b = a.clone();
        b.tables.pop();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(
            a.fingerprint(),
            Catalogue::product_management().fingerprint()
        );
    }
}
