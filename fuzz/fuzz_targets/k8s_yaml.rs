//! The YAML translator on any text: never panics; a refusal names the file and a document.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_model::k8s::load_docs;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    if let Err(e) = load_docs(&[("f.yaml".to_string(), text)]) {
        let msg = e.to_string();
        assert!(msg.starts_with("f.yaml doc "), "{msg}");
    }
});
