//! The cursor: where HQ is in a branch's change stream.
//!
//! The pull area is cut into *windows* by ticks (PgQ style). A tick is a point in the
//! branch's commit history: on PostgreSQL a stored `pg_snapshot`, on SQLite the highest
//! committed sequence at that moment. A cursor names a tick; the changes after it are
//! the windows (tick, next tick], (next tick, ...]. A window boundary is always a
//! transaction boundary, so a batch made of whole windows never splits a transaction.
//!
//! The cursor also carries the lineage: the pull area's instance id and the tick's own
//! random uuid. A cursor from another instance (re-installed or foreign database), or
//! whose tick exists with another uuid (a restore followed by new activity), is refused.
//!
//! Text form: `<instance uuid>:<tick id>:<tick uuid>`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cursor {
    pub instance_id: Uuid,
    pub tick: i64,
    pub tick_uuid: Uuid,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed cursor {input:?}: {reason} (expected <instance uuid>:<tick id>:<tick uuid>)")]
pub struct CursorError {
    pub input: String,
    pub reason: &'static str,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.instance_id, self.tick, self.tick_uuid)
    }
}

impl FromStr for Cursor {
    type Err = CursorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| CursorError {
            input: s.chars().take(120).collect(),
            reason,
        };
        let mut parts = s.split(':');
        let (Some(i), Some(t), Some(u), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(err("wrong number of parts"));
        };
        let instance_id = Uuid::parse_str(i).map_err(|_| err("instance id is not a uuid"))?;
        let tick: i64 = t.parse().map_err(|_| err("tick is not an integer"))?;
        if tick < 0 {
            return Err(err("tick is negative"));
        }
        let tick_uuid = Uuid::parse_str(u).map_err(|_| err("tick uuid is not a uuid"))?;
        Ok(Cursor {
            instance_id,
            tick,
            tick_uuid,
        })
    }
}

impl Serialize for Cursor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cursor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let c = Cursor {
            instance_id: Uuid::new_v4(),
            tick: 42,
            tick_uuid: Uuid::new_v4(),
        };
        assert_eq!(c.to_string().parse::<Cursor>().unwrap(), c);
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Cursor>(&j).unwrap(), c);
    }

    #[test]
    fn malformed_cursors_name_the_problem() {
        for (s, why) in [
            ("", "wrong number of parts"),
            ("a:b", "wrong number of parts"),
            (
                "x:1:00000000-0000-0000-0000-000000000000",
                "instance id is not a uuid",
            ),
            (
                "00000000-0000-0000-0000-000000000000:zz:00000000-0000-0000-0000-000000000000",
                "tick is not an integer",
            ),
            (
                "00000000-0000-0000-0000-000000000000:-1:00000000-0000-0000-0000-000000000000",
                "tick is negative",
            ),
        ] {
            assert_eq!(s.parse::<Cursor>().unwrap_err().reason, why, "{s}");
        }
    }
}
