//! Streaming the input as bytes, line by line, within a memory bound.

use std::io::{self, BufRead};

use crate::core::message::{MAX_LINE_BYTES, MAX_RAW_BYTES};

/// One line of input, without its `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// 1-based line number.
    pub number: u64,
    /// The line's bytes; for an oversize line only its first 64 KiB.
    pub bytes: Vec<u8>,
    /// The line was longer than 1 MiB.
    pub oversize: bool,
}

/// Reads lines of any length from a byte stream, holding at most 1 MiB of one
/// line: the rest of a longer line is skipped, its head kept for the dead
/// letter. A last line without `\n` is a line too.
pub struct LineReader<R> {
    inner: R,
    number: u64,
    consumed: u64,
}

impl<R: BufRead> LineReader<R> {
    /// Wraps a buffered reader.
    pub fn new(inner: R) -> Self {
        LineReader {
            inner,
            number: 0,
            consumed: 0,
        }
    }

    /// Bytes consumed so far, newlines included.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// The next line, or `None` at the end of the stream.
    pub fn next_line(&mut self) -> io::Result<Option<Line>> {
        let mut bytes = Vec::new();
        let mut oversize = false;
        let mut any = false;
        loop {
            let buf = match self.inner.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                if !any {
                    return Ok(None);
                }
                break;
            }
            any = true;
            let (chunk, used, end) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..i], i + 1, true),
                None => (buf, buf.len(), false),
            };
            if !oversize {
                if bytes.len() + chunk.len() > MAX_LINE_BYTES {
                    oversize = true;
                    let keep = MAX_RAW_BYTES.saturating_sub(bytes.len()).min(chunk.len());
                    bytes.extend_from_slice(&chunk[..keep]);
                    bytes.truncate(MAX_RAW_BYTES);
                    bytes.shrink_to_fit();
                } else {
                    bytes.extend_from_slice(chunk);
                }
            }
            self.inner.consume(used);
            self.consumed += used as u64;
            if end {
                break;
            }
        }
        self.number += 1;
        Ok(Some(Line {
            number: self.number,
            bytes,
            oversize,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<Line> {
        // A tiny buffer makes lines cross buffer boundaries.
        let mut r = LineReader::new(io::BufReader::with_capacity(7, input));
        let mut out = vec![];
        while let Some(line) = r.next_line().unwrap() {
            out.push(line);
        }
        assert_eq!(r.consumed(), input.len() as u64);
        out
    }

    #[test]
    fn lines_split_on_newline_and_keep_a_last_line_without_one() {
        let got = lines(b"one\r\ntwo\n\nthree");
        let texts: Vec<&[u8]> = got.iter().map(|l| l.bytes.as_slice()).collect();
        assert_eq!(texts, vec![&b"one\r"[..], b"two", b"", b"three"]);
        assert_eq!(
            got.iter().map(|l| l.number).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
    }

    #[test]
    fn an_empty_stream_has_no_lines() {
        assert!(lines(b"").is_empty());
        assert_eq!(lines(b"\n").len(), 1);
    }

    #[test]
    fn a_line_over_1_mib_keeps_only_its_head_and_the_next_line_is_read() {
        let mut input = vec![b'x'; 2 * 1024 * 1024];
        input.extend_from_slice(b"\nnext\n");
        let got = lines(&input);
        assert_eq!(got.len(), 2);
        assert!(got[0].oversize);
        assert_eq!(got[0].bytes.len(), MAX_RAW_BYTES);
        assert_eq!(got[1].bytes, b"next");
        assert!(!got[1].oversize);
    }

    #[test]
    fn a_line_of_exactly_1_mib_is_not_oversize() {
        let mut input = vec![b'x'; MAX_LINE_BYTES];
        input.push(b'\n');
        let got = lines(&input);
        assert!(!got[0].oversize);
        assert_eq!(got[0].bytes.len(), MAX_LINE_BYTES);
    }
}
