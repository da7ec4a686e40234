//! Request headers in both forms.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::request::Request;

fuzz_target!(|data: &[u8]| {
    for extended in [false, true] {
        if let Ok(req) = Request::decode(data, extended) {
            let mut b = bytes::BytesMut::new();
            if extended || req.length <= u32::MAX as u64 {
                req.encode(&mut b, extended);
                assert_eq!(Request::decode(&b, extended).unwrap(), req);
            }
        }
    }
});
