//! The `ferry` binary: parse the command line, install tracing, run a verb.

use std::process::ExitCode;

use clap::Parser;
use ferry::cli::LogFormat;
use tracing_subscriber::EnvFilter;

/// Allocations at least this large get their own mapping from glibc's
/// malloc, returned to the kernel when freed.
///
/// glibc raises its mmap threshold on its own (up to 32 MiB) each time a
/// mapped block is freed, and its trim threshold with it. ferry moves 1 MiB
/// snapshot chunks and multi-MiB batches between threads (socket reader,
/// RocksDB reads on the blocking pool, the applier), so past the first few,
/// those buffers came from per-thread heaps that kept the freed space: the
/// memory-bound case of benches/README.md peaked at 222 MiB RSS with glibc's
/// default, and at 75 MiB with this fixed at 256 KiB (which also turns the
/// dynamic adjustment off).
///
/// At 256 KiB, though, every group commit's buffers (RocksDB's write batch
/// as it grows, the writer's and the applier's entry vectors) were fresh
/// mappings whose pages faulted in on first touch: 0.14 minor faults per
/// replicated command at full rate even with [`TRIM_THRESHOLD`]. At 1 MiB
/// it is 0.06-0.10, and a big value's 1 MiB fragments are still mapped
/// apart (tests/big_values.rs: peak RSS 76-97 MiB, against 70-88 at 256 KiB
/// and 97-142 at 4 MiB, where the faults drop to 0.014 per command; the
/// figures are in benches/README.md, issue 13, eighth round).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 1024 * 1024;

/// Free memory at the top of one of glibc's heaps is kept up to this size
/// rather than given back to the kernel.
///
/// Fixing [`MMAP_THRESHOLD`] also fixes glibc's trim threshold, at its
/// default of 128 KiB: each heap was shrunk whenever more than that was free
/// at its top, and the next batch faulted the same pages in again. At full
/// rate (with the mmap threshold at 256 KiB) that was 0.24 minor page faults
/// per replicated command; with 8 MiB, 0.12, about 8% less CPU per command,
/// for 4-15 MiB more peak RSS (benches/README.md, issue 13, eighth round).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 8 * 1024 * 1024;

/// Applies [`MMAP_THRESHOLD`] and [`TRIM_THRESHOLD`], each unless the
/// operator set it through glibc (`MALLOC_MMAP_THRESHOLD_`,
/// `MALLOC_TRIM_THRESHOLD_`, or `glibc.malloc.mmap_threshold` /
/// `glibc.malloc.trim_threshold` in `GLIBC_TUNABLES`), which glibc has
/// applied already. Runs first in `main`, before any thread.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (variable, tunable, parameter, value, name) in [
        (
            "MALLOC_MMAP_THRESHOLD_",
            "glibc.malloc.mmap_threshold",
            libc::M_MMAP_THRESHOLD,
            MMAP_THRESHOLD,
            "M_MMAP_THRESHOLD",
        ),
        (
            "MALLOC_TRIM_THRESHOLD_",
            "glibc.malloc.trim_threshold",
            libc::M_TRIM_THRESHOLD,
            TRIM_THRESHOLD,
            "M_TRIM_THRESHOLD",
        ),
    ] {
        if std::env::var_os(variable).is_some() || tunables.contains(tunable) {
            continue;
        }
        // SAFETY: mallopt only changes malloc's parameters; it is called
        // before any other thread exists. A refusal (return 0) leaves
        // glibc's defaults, which are correct, only hungrier.
        let accepted = unsafe { libc::mallopt(parameter, value) };
        if accepted == 0 {
            eprintln!("warning: malloc refused {name}={value}");
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
