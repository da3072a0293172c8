//! Path normalisation of a request target: never panics; the result is canonical (absolute,
//! no `//`, no dot segments, no encoded separator or NUL, no `\`) and normalising it again
//! changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_model::route::{host_without_port, normalize_path, percent_decode};

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let _ = percent_decode(raw);
    assert!(raw.starts_with(host_without_port(raw)));
    let Ok(n) = normalize_path(raw) else { return };
    let p = &n.path;
    let lower = p.to_ascii_lowercase();
    assert!(
        p.starts_with('/') && !p.contains("//") && !p.contains('\\'),
        "{p:?}"
    );
    assert!(
        !lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%00"),
        "{p:?}"
    );
    assert!(p.split('/').all(|s| s != "." && s != ".."), "{p:?}");
    assert_eq!(normalize_path(p).map(|again| again.path).as_ref(), Ok(p));
});
