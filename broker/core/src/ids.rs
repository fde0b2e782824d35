//! Identifiers that cross shards: connections and streams on them.

use std::fmt;

/// Index of a shard (one per core).
pub type ShardId = u16;

/// A connection, anywhere in the broker: its shard, its slot there and the
/// slot's generation (so a reused slot is never mistaken for the old
/// connection).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    /// The shard that owns the connection.
    pub shard: ShardId,
    /// Slot in that shard's connection table.
    pub slot: u32,
    /// Generation of the slot.
    pub generation: u32,
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}.{}.{}", self.shard, self.slot, self.generation)
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A stream on a connection: where a request came from, or went to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct StreamRef {
    /// The connection.
    pub conn: ConnId,
    /// The stream id on that connection.
    pub stream: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_print_as_shard_slot_generation() {
        let id = ConnId {
            shard: 1,
            slot: 22,
            generation: 3,
        };
        // Logs and the admin API name connections this way.
        assert_eq!(id.to_string(), "c1.22.3");
        assert_eq!(format!("{id:?}"), "c1.22.3");
    }
}
