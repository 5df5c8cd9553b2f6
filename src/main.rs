//! The `ferry` binary: parse the command line, install tracing, run a verb.

fn main() -> anyhow::Result<()> {
    Ok(())
}
