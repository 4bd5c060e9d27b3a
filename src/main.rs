//! The `normalizer` binary. Everything lives in the library; see `cli::main`.

/// mimalloc, not glibc's malloc: the one SQLite writer frees what the
/// reader thread allocated, which glibc's arenas made a tenth of its time
/// (docs/PERFORMANCE.md, "The allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (the crate's
/// version is pinned in Cargo.toml for this number).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // Freed memory goes back to the system at once, not after a second:
    // with mimalloc's delay the peak RSS of a 1,000,000-message SQLite
    // ingest was 113 MiB, without it 81 MiB (glibc: 85 MiB). The
    // environment's MIMALLOC_PURGE_DELAY, if set, still wins.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: before any other thread exists (the option is not
        // thread-safe to set), with a valid option number and value.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
    normalizer::cli::main()
}
