//! Redis commands as argument vectors, and (later in this module) the Redis 7
//! command table.

use bytes::Bytes;

/// One Redis command: its arguments, name first, exactly as sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Command {
    pub args: Vec<Bytes>,
}

impl Command {
    pub fn new(args: Vec<Bytes>) -> Command {
        Command { args }
    }

    /// Builds a command from anything byte-like, e.g. `Command::from_parts(["SET", "k", "v"])`.
    pub fn from_parts<I, T>(parts: I) -> Command
    where
        I: IntoIterator<Item = T>,
        T: AsRef<[u8]>,
    {
        Command {
            args: parts
                .into_iter()
                .map(|p| Bytes::copy_from_slice(p.as_ref()))
                .collect(),
        }
    }

    /// The command name as sent (any case); empty for an empty command.
    pub fn name(&self) -> &[u8] {
        self.args.first().map(|a| a.as_ref()).unwrap_or(&[])
    }

    /// True when the name equals `name`, ASCII case-insensitively.
    pub fn is(&self, name: &str) -> bool {
        self.name().eq_ignore_ascii_case(name.as_bytes())
    }

    /// Bytes of argument data, for accounting.
    pub fn data_len(&self) -> usize {
        self.args.iter().map(|a| a.len()).sum()
    }
}
