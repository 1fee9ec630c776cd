//! Payload compression, between [`frame::compact`] and sealing: raw DEFLATE
//! (RFC 1951, miniz_oxide) when it pays, the compact form as it is otherwise.
//!
//! The first byte says which. [`frame::COMPACT_VERSION`] (`01`): the compact form.
//! [`DEFLATED`] (`02`): the compact form, its own `01` included, deflated. Deflate
//! was picked on the numbers in README's "Compression": lz4 is smaller on mips
//! but sends a third more; zstd, with or without a dictionary, is fourteen times
//! deflate's size for about its ratio.
//!
//! Pure: no I/O. Inflating never allocates past [`MAX_INFLATED`] and stops as soon
//! as the output would pass it, so a small payload cannot make a node allocate
//! what it claims (a decompression bomb).

use std::borrow::Cow;

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use crate::frame;

/// First byte of a payload whose compact form is deflated.
pub const DEFLATED: u8 = 2;
/// Shorter payloads go as they are: acks, hellos and one-line results save a few
/// bytes at most (measured in `benches/codecs.rs`), not worth the receiver's work.
pub const MIN_LEN: usize = 128;
/// Most a deflated payload may inflate to. A sender packs frames into payloads of
/// at most `max_payload` (64 KiB), or sends one larger frame (at most
/// [`frame::MAX_FRAME`]) alone, and a frame's compact form is never more than a
/// few bytes longer than the frame; [`shrink`] never deflates anything longer.
pub const MAX_INFLATED: usize = frame::MAX_FRAME + 64 * 1024;
/// miniz's default level: within 1% of level 9 on command outputs, twice as fast.
const LEVEL: u8 = 6;
/// Collision entropy (Rényi order 2, bits per byte) above which a payload is taken
/// for compressed or encrypted data (file chunks of archives, images) and not
/// tried: random bytes measure 7.9 in a 4 KiB sample, command outputs 4 to 6. As
/// `2^RANDOM_BITS`, 181 ≈ 2^7.5: integers only (mips has no FPU).
const RANDOM_BITS_EXP2: u64 = 181;
/// Bytes the entropy check looks at, spread over the payload.
const SAMPLE: usize = 4096;

/// Why a received payload could not be inflated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    #[error("deflated payload inflates past {MAX_INFLATED} bytes (a decompression bomb?)")]
    TooLarge,
    #[error("corrupt deflated payload ({0})")]
    Corrupt(String),
}

/// The payload to seal for a compact payload: deflated behind [`DEFLATED`] when
/// that saves at least 1/32 of it and 8 bytes, `compact` itself otherwise (short,
/// looks random, too large to inflate at the receiver, or did not shrink).
pub fn shrink(compact: Vec<u8>) -> Vec<u8> {
    if compact.len() < MIN_LEN || compact.len() > MAX_INFLATED || looks_random(&compact) {
        return compact;
    }
    let mut out = Vec::with_capacity(compact.len() / 2 + 1);
    out.push(DEFLATED);
    out.extend_from_slice(&miniz_oxide::deflate::compress_to_vec(&compact, LEVEL));
    if out.len() + compact.len() / 32 + 8 > compact.len() {
        return compact;
    }
    out
}

/// The compact payload inside a received one: inflated if it starts with
/// [`DEFLATED`], borrowed as it is otherwise (including anything unknown, for
/// [`frame::expand`] to refuse).
pub fn restore(payload: &[u8]) -> Result<Cow<'_, [u8]>, InflateError> {
    match payload.split_first() {
        Some((&DEFLATED, deflated)) => inflate(deflated, MAX_INFLATED).map(Cow::Owned),
        _ => Ok(Cow::Borrowed(payload)),
    }
}

/// Inflates raw DEFLATE into at most `limit` bytes. The buffer grows by doubling
/// (`reserve_exact`, so never past `limit`), and a stream that would go on past
/// `limit` is refused as soon as the buffer is full.
fn inflate(deflated: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    let mut state = Box::<DecompressorOxide>::default();
    let mut out = Vec::new();
    let mut len = (deflated.len() * 4).clamp(1024, limit);
    let mut input = deflated;
    let mut at = 0;
    loop {
        out.reserve_exact(len - out.len());
        out.resize(len, 0);
        // The whole output stays in one buffer, so back-references reach it.
        let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
        let (status, used, made) = decompress(&mut state, input, &mut out, at, flags);
        at += made;
        input = &input[used.min(input.len())..];
        match status {
            TINFLStatus::Done if input.is_empty() => {
                out.truncate(at);
                return Ok(out);
            }
            TINFLStatus::Done => return Err(InflateError::Corrupt("trailing bytes".into())),
            TINFLStatus::HasMoreOutput if len == limit => return Err(InflateError::TooLarge),
            TINFLStatus::HasMoreOutput => len = (len * 2).min(limit),
            other => return Err(InflateError::Corrupt(format!("{other:?}"))),
        }
    }
}

/// Whether `bytes` look like compressed or encrypted data: the collision entropy
/// of up to [`SAMPLE`] bytes taken in runs of 64 spread over it, above 7.5 bits,
/// that is `sum(count²) · 2^7.5 < n²`. One pass over at most 4 KiB, much cheaper
/// than deflating 16 KiB to learn it does not shrink.
fn looks_random(bytes: &[u8]) -> bool {
    let mut counts = [0u64; 256];
    let mut n = 0u64;
    let step = (bytes.len() / (SAMPLE / 64)).max(64);
    for start in (0..bytes.len()).step_by(step) {
        for &b in &bytes[start..(start + 64).min(bytes.len())] {
            counts[b as usize] += 1;
            n += 1;
        }
    }
    let collisions: u64 = counts.iter().map(|c| c * c).sum();
    collisions * RANDOM_BITS_EXP2 < n * n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::COMPACT_VERSION;

    /// Deterministic noise (xorshift), as incompressible as /dev/urandom.
    fn noise(n: usize, mut x: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn text(n: usize) -> Vec<u8> {
        let mut out = vec![COMPACT_VERSION];
        let mut i = 0;
        while out.len() < n {
            let line = format!(
                "root {i:5} 0.0 0.1 {:6} {:5} ? S 10:02 0:00 [kworker/{i}:1]\n",
                i * 7,
                i * 3
            );
            out.extend_from_slice(line.as_bytes());
            i += 1;
        }
        out.truncate(n);
        out
    }

    #[test]
    fn text_deflates_and_restores_exactly() {
        for n in [MIN_LEN, 1000, 16 * 1024, 64 * 1024] {
            let plain = text(n);
            let sent = shrink(plain.clone());
            assert_eq!(sent[0], DEFLATED, "{n} bytes");
            assert!(sent.len() < n * 3 / 5, "{n} bytes became {}", sent.len());
            assert_eq!(restore(&sent).unwrap(), plain);
        }
    }

    #[test]
    fn short_random_and_unshrinkable_payloads_go_as_they_are() {
        let short = text(MIN_LEN - 1);
        assert_eq!(shrink(short.clone()), short);
        let mut chunk = vec![COMPACT_VERSION];
        chunk.extend(noise(16 * 1024, 1));
        assert!(looks_random(&chunk));
        assert_eq!(shrink(chunk.clone()), chunk);
        // Below the entropy bar but still not worth it: deflate is tried, and the
        // plain form kept.
        let mut mixed = text(600);
        mixed.extend(noise(400, 2));
        assert!(!looks_random(&mixed));
        let sent = shrink(mixed.clone());
        assert!(sent == mixed || sent.len() + mixed.len() / 32 + 8 <= mixed.len());
        assert_eq!(restore(&sent).unwrap(), mixed);
    }

    #[test]
    fn text_does_not_look_random_and_already_deflated_data_does() {
        assert!(!looks_random(&text(64 * 1024)));
        assert!(!looks_random(&text(200)));
        // What a .gz holds: real outputs deflate to 7.9 bits or more (measured on
        // ps, ls -l and dmesg). Hex digits of noise are text with real content.
        let hex: String = noise(64 * 1024, 3)
            .iter()
            .map(|b| format!("{b:02x} "))
            .collect();
        let gz = miniz_oxide::deflate::compress_to_vec(hex.as_bytes(), 6);
        assert!(gz.len() > 4096 && looks_random(&gz), "{} bytes", gz.len());
    }

    #[test]
    fn plain_and_unknown_payloads_are_borrowed_untouched() {
        let plain = text(300);
        assert!(matches!(restore(&plain).unwrap(), Cow::Borrowed(b) if b == plain.as_slice()));
        assert!(matches!(
            restore(&[9, 1, 2]).unwrap(),
            Cow::Borrowed(&[9, 1, 2])
        ));
        assert!(matches!(restore(&[]).unwrap(), Cow::Borrowed(&[])));
    }

    #[test]
    fn a_bomb_is_refused_once_it_passes_the_limit() {
        // 64 MiB of zeros deflate to about 64 KiB: a thousandfold.
        let bomb = miniz_oxide::deflate::compress_to_vec(&vec![0u8; 64 << 20], 9);
        assert!(bomb.len() < 100 * 1024, "{}", bomb.len());
        let mut payload = vec![DEFLATED];
        payload.extend_from_slice(&bomb);
        assert_eq!(restore(&payload), Err(InflateError::TooLarge));
        // Exactly at the limit is fine; one byte past it is not.
        let at = miniz_oxide::deflate::compress_to_vec(&vec![1u8; 5000], 6);
        assert_eq!(inflate(&at, 5000).unwrap().len(), 5000);
        assert_eq!(inflate(&at, 4999), Err(InflateError::TooLarge));
    }

    #[test]
    fn corrupt_and_truncated_streams_are_refused() {
        let sent = shrink(text(4000));
        let mut cut = sent.clone();
        cut.truncate(sent.len() / 2);
        assert!(matches!(restore(&cut), Err(InflateError::Corrupt(_))));
        let mut trailing = sent.clone();
        trailing.push(0);
        assert!(matches!(restore(&trailing), Err(InflateError::Corrupt(_))));
        assert!(matches!(
            restore(&[DEFLATED, 0xff, 0xff]),
            Err(InflateError::Corrupt(_))
        ));
        // Whatever the bytes, restoring never panics.
        for seed in 1..200 {
            let mut p = vec![DEFLATED];
            p.extend(noise(seed as usize * 7, seed));
            let _ = restore(&p);
        }
    }
}
