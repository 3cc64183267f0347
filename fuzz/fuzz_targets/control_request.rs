//! The control request decoder, with the server's own checks: a body over
//! the size limit is refused before decoding (413); anything else goes to
//! `serde_json::from_slice::<Request>`. Whatever decodes must be valid
//! JSON and re-encode to the same request.
#![no_main]

use baton::protocol::{Request, MAX_REQUEST_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if body.len() > MAX_REQUEST_BYTES {
        return;
    }
    let Ok(request) = serde_json::from_slice::<Request>(body) else {
        return;
    };
    assert!(
        serde_json::from_slice::<serde_json::Value>(body).is_ok(),
        "accepted a body that is not JSON"
    );
    let json = serde_json::to_vec(&request).expect("a decoded request encodes");
    let again: Request = serde_json::from_slice(&json).expect("an encoded request decodes");
    assert_eq!(request, again);
});
