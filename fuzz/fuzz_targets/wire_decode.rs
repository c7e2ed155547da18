//! Wire decoding of untrusted bytes: `decode_frame` on the raw input, and the input as a
//! length-prefixed stream through `FrameBuffer`. Must never panic; every decoded control
//! message (other than `Unknown`) must re-encode canonically: the re-encoding equals the
//! frame it came from and decodes to an equal message. Chunk frames must survive a
//! re-encode/decode round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pollen_protocol::wire::{Frame, FrameBuffer, Message, decode_frame, encode_chunk_frame};

fn check_frame(frame: &[u8]) {
    match decode_frame(frame) {
        Ok(Frame::Control(Message::Unknown(_))) | Err(_) => {}
        Ok(Frame::Control(msg)) => {
            let enc = msg.encode();
            // Decoding is canonical, so the only encoding of `msg` is the one we got.
            assert_eq!(
                enc, frame,
                "re-encoding differs from the decoded frame: {msg:?}"
            );
            match decode_frame(&enc) {
                Ok(Frame::Control(again)) => {
                    assert_eq!(again, msg, "roundtrip changed the message")
                }
                other => panic!("re-encoding of {msg:?} does not decode back: {other:?}"),
            }
            assert_eq!(msg.wire_len(), 4 + enc.len());
        }
        Ok(Frame::Chunk(header, data)) => {
            let enc = encode_chunk_frame(&header, data);
            assert_eq!(
                decode_frame(&enc),
                Ok(Frame::Chunk(header, data)),
                "chunk frame roundtrip changed it"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check_frame(data);

    let mut fb = FrameBuffer::new();
    fb.extend(data);
    // Stops at Ok(None) (needs more bytes) or at an error (the stream would be closed).
    while let Ok(Some(frame)) = fb.next_frame() {
        check_frame(&frame);
    }
});
