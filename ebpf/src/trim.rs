//! Hands memory the allocator holds but no longer uses back to the kernel, after the one
//! allocation-heavy step of this crate. Loading a program makes aya parse the kernel's BTF
//! (`/sys/kernel/btf/vmlinux`, ~5 MB of type information, ~10 MiB once parsed) and free it
//! again; glibc keeps what it can of that in the loading thread's arena. Loads run on one
//! thread (`capture::loader`), which trims after each.

// The only unsafe code of the crate: one libc call.
#![allow(unsafe_code)]

/// Returns the allocator's free memory at the top of every arena to the kernel (glibc's
/// `malloc_trim(0)`); nothing elsewhere.
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes no pointer and only walks the allocator's own free lists,
    // locking each arena while it does; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
