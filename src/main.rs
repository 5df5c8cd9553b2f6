//! The `ferry` binary: parse the command line, install tracing, run a verb.

use std::process::ExitCode;

use clap::Parser;
use ferry::cli::LogFormat;
use tracing_subscriber::EnvFilter;

/// Allocations at least this large get their own mapping from glibc's
/// malloc, returned to the kernel when freed.
///
/// glibc raises its mmap threshold on its own (up to 32 MiB) each time a
/// mapped block is freed. ferry moves 1 MiB snapshot chunks and multi-MiB
/// batches between threads (socket reader, RocksDB reads on the blocking
/// pool, the applier), so past the first few, those buffers came from
/// per-thread heaps that kept the freed space: the memory-bound case of
/// benches/README.md peaked at 222 MiB RSS with glibc's default and at
/// 75 MiB with the threshold fixed here. Setting it also turns the dynamic
/// adjustment off.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 256 * 1024;

/// Applies [`MMAP_THRESHOLD`], unless the operator set glibc's own
/// `MALLOC_MMAP_THRESHOLD_` (which glibc has applied already). Runs first
/// in `main`, before any thread.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only changes malloc's parameters; it is called
        // before any other thread exists. A refusal (return 0) leaves
        // glibc's defaults, which are correct, only hungrier.
        let accepted = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        if accepted == 0 {
            eprintln!("warning: malloc refused M_MMAP_THRESHOLD={MMAP_THRESHOLD}");
        }
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = ferry::cli::Cli::parse();
    let default_filter = if cli.verb.is_daemon() { "info" } else { "warn" };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Logs go to stderr so that stdout stays clean for `rdb dump`.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // Spans as a list, the current one too: a line names its
        // partition or connection without walking the span tree.
        LogFormat::Json => logs.json().with_span_list(true).init(),
    }
    match ferry::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
