//! Compiles the C eBPF programs in `src/*.bpf.c` into `$OUT_DIR/*.bpf.o` with clang.
//!
//! Rust eBPF (aya-ebpf) needs `bpf-linker`, which does not build on our machines, so the kernel
//! side is C compiled by the distribution's clang (`-target bpf`, with `-g` so the object
//! carries BTF, which aya uses for maps and globals).

use std::env;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

/// The programs, by file stem; the loader includes `$OUT_DIR/<stem>.bpf.o`.
const PROGRAMS: &[&str] = &["capture"];

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default());
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    println!("cargo:rerun-if-env-changed=CLANG");
    // `linux/types.h` includes `asm/types.h`, which Debian keeps under the multiarch directory
    // of the *host* (the BPF target has no headers of its own).
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    for stem in PROGRAMS {
        let src = Path::new("src").join(format!("{stem}.bpf.c"));
        println!("cargo:rerun-if-changed={}", src.display());
        let obj = out_dir.join(format!("{stem}.bpf.o"));
        if let Err(message) = compile(&clang, &multiarch, &src, &obj) {
            eprintln!("error: {message}");
            exit(1);
        }
    }
}

fn compile(clang: &str, multiarch: &str, src: &Path, obj: &Path) -> Result<(), String> {
    let output = Command::new(clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I{multiarch}"))
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(obj)
        .output()
        .map_err(|e| {
            format!(
                "run {clang} to compile {}: {e}; the eBPF programs need clang and the libbpf \
                 headers (Debian: apt-get install -y clang llvm libbpf-dev), or set CLANG",
                src.display()
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "compile {} with {clang} failed (missing headers? Debian: apt-get install -y \
             libbpf-dev linux-libc-dev):\n{}",
            src.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}
