//! The log upload framing remote workers send to `PUT /v1/worker/log`:
//! `[stream][0,0,0][len u32 BE][len bytes]`, repeated (`protocol::decode_log_frames`).
//!
//! The first byte picks what the rest is. Raw bytes: whatever decodes is exactly what
//! encoding the chunks gives back (one way to write each upload), its lengths add up,
//! and a truncated upload never decodes. Chunks: `decode(encode(chunks)) == chunks`,
//! and a cut of the encoding decodes only at a frame boundary, to the frames before it.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tasuki::domain::ports::{OutputChunk, Stream};
use tasuki::protocol::{decode_log_frames, encode_log_frames};

#[derive(Arbitrary, Debug)]
struct Chunks {
    chunks: Vec<(bool, Vec<u8>)>,
    cut: u16,
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        raw(rest);
    } else if let Ok(Chunks { chunks, cut }) = Chunks::arbitrary_take_rest(Unstructured::new(rest))
    {
        round_trip(chunks, cut);
    }
});

fn raw(body: &[u8]) {
    let Ok(chunks) = decode_log_frames(Bytes::copy_from_slice(body)) else {
        return;
    };
    let total: usize = chunks.iter().map(|c| 8 + c.bytes.len()).sum();
    assert_eq!(total, body.len());
    assert_eq!(
        encode_log_frames(&chunks),
        body,
        "decoded {chunks:?}, which encodes otherwise"
    );
    if !body.is_empty() {
        for cut in [body.len() - 1, body.len().saturating_sub(8)] {
            let partial = &body[..cut];
            // Cutting a whole frame off leaves whole frames.
            let at_boundary = chunks
                .iter()
                .scan(0, |at, c| {
                    *at += 8 + c.bytes.len();
                    Some(*at)
                })
                .chain([0])
                .any(|end| end == cut);
            assert_eq!(
                decode_log_frames(Bytes::copy_from_slice(partial)).is_ok(),
                at_boundary,
                "cut at {cut} of {}",
                body.len()
            );
        }
    }
}

fn round_trip(chunks: Vec<(bool, Vec<u8>)>, cut: u16) {
    let chunks: Vec<OutputChunk> = chunks
        .into_iter()
        .map(|(stdout, bytes)| OutputChunk {
            stream: if stdout {
                Stream::Stdout
            } else {
                Stream::Stderr
            },
            bytes: Bytes::from(bytes),
        })
        .collect();
    let body = encode_log_frames(&chunks);
    let decoded = decode_log_frames(Bytes::from(body.clone())).expect("an encoding decodes");
    assert_eq!(decoded, chunks);

    let cut = cut as usize % (body.len() + 1);
    let mut ends = vec![0];
    let mut at = 0;
    for c in &chunks {
        at += 8 + c.bytes.len();
        ends.push(at);
    }
    match ends.iter().position(|&end| end == cut) {
        Some(whole) => {
            let got = decode_log_frames(Bytes::copy_from_slice(&body[..cut]))
                .expect("whole frames decode");
            assert_eq!(got, chunks[..whole]);
        }
        None => assert!(decode_log_frames(Bytes::copy_from_slice(&body[..cut])).is_err()),
    }
}
