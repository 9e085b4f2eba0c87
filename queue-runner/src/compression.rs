//! zstd compression for the cache's NARs and the step logs, with one compression context per
//! thread, reused: creating a context allocates and clears several hundred kilobytes, which cost
//! more than compressing a typical small output or log.

use std::cell::RefCell;
use std::io::{self, Write};

use zstd::zstd_safe::{CCtx, CParameter};

/// The compression level: zstd's default, fast enough to keep up with uploads.
pub const LEVEL: i32 = 3;

thread_local! {
    static CONTEXT: RefCell<Option<CCtx<'static>>> = const { RefCell::new(None) };
}

/// Runs `body` with a zstd encoder writing to `writer` and finishes the frame; returns what
/// `body` returned and the writer. Reuses this thread's context (a fresh one if it is in use).
pub fn compress<W: Write, T>(
    writer: W,
    body: impl FnOnce(&mut zstd::Encoder<'_, W>) -> T,
) -> io::Result<(T, W)> {
    CONTEXT.with(|cell| match cell.try_borrow_mut() {
        Ok(mut slot) => {
            if slot.is_none() {
                *slot = Some(new_context()?);
            }
            let context = slot
                .as_mut()
                .ok_or_else(|| io::Error::other("no compression context"))?;
            run(zstd::Encoder::with_context(writer, context), body)
        }
        Err(_) => run(zstd::Encoder::new(writer, LEVEL)?, body),
    })
}

fn run<W: Write, T>(
    mut encoder: zstd::Encoder<'_, W>,
    body: impl FnOnce(&mut zstd::Encoder<'_, W>) -> T,
) -> io::Result<(T, W)> {
    let result = body(&mut encoder);
    Ok((result, encoder.finish()?))
}

fn new_context() -> io::Result<CCtx<'static>> {
    let mut context =
        CCtx::try_create().ok_or_else(|| io::Error::other("zstd is out of memory"))?;
    context
        .set_parameter(CParameter::CompressionLevel(LEVEL))
        .map_err(|code| io::Error::other(zstd::zstd_safe::get_error_name(code)))?;
    Ok(context)
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    #[test]
    fn frames_made_with_a_reused_context_decompress_independently() {
        let long = vec![7u8; 100_000];
        for text in [&b"first frame"[..], b"", &long] {
            let ((), compressed) =
                compress(Vec::new(), |encoder| encoder.write_all(text).unwrap()).unwrap();
            let mut decompressed = Vec::new();
            zstd::Decoder::new(compressed.as_slice())
                .unwrap()
                .read_to_end(&mut decompressed)
                .unwrap();
            assert_eq!(decompressed, text);
        }
    }
}
