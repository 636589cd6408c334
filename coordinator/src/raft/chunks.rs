//! Snapshot messages in chunks: a raft `MsgSnapshot` carries the whole state machine, which can
//! be far larger than one gRPC message. The sender cuts its encoding into chunks
//! ([`chunk`]); the receiver reassembles them ([`Reassembly`]), checking every chunk's header
//! against the first and the total against a limit, before anything is decoded.

/// Bytes of one chunk at most (well under the gRPC message limit).
pub const SNAPSHOT_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Bytes of one snapshot message at most (it is held in memory while it is reassembled).
pub const SNAPSHOT_BYTES_MAX: u64 = 4 * 1024 * 1024 * 1024;

/// The header every chunk of one snapshot repeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub cluster_id: String,
    pub from: u64,
    pub to: u64,
    pub total_bytes: u64,
}

/// `encoded` in chunks of at most `chunk_bytes` (at least one chunk, even when empty).
pub fn chunk(encoded: &[u8], chunk_bytes: usize) -> Vec<&[u8]> {
    if encoded.is_empty() {
        return vec![encoded];
    }
    encoded.chunks(chunk_bytes.max(1)).collect()
}

/// A snapshot being received.
#[derive(Debug)]
pub struct Reassembly {
    header: Header,
    bytes: Vec<u8>,
}

impl Reassembly {
    /// Starts with the first chunk's header; refuses a total over the limit.
    pub fn start(header: Header) -> Result<Reassembly, String> {
        if header.total_bytes > SNAPSHOT_BYTES_MAX {
            return Err(format!("a snapshot of {} bytes; at most {SNAPSHOT_BYTES_MAX}", header.total_bytes));
        }
        // Reserve only what one chunk brings at a time: a header must not allocate gigabytes.
        Ok(Reassembly { header, bytes: Vec::new() })
    }

    /// Adds the next chunk, which must repeat the header and stay within the total.
    pub fn push(&mut self, header: &Header, data: &[u8]) -> Result<(), String> {
        if *header != self.header {
            return Err(format!("chunk header {header:?} differs from the first chunk's {:?}", self.header));
        }
        if self.bytes.len() as u64 + data.len() as u64 > self.header.total_bytes {
            return Err(format!("chunks carry more than the {} bytes announced", self.header.total_bytes));
        }
        if data.len() > SNAPSHOT_CHUNK_BYTES {
            return Err(format!("a chunk of {} bytes; at most {SNAPSHOT_CHUNK_BYTES}", data.len()));
        }
        self.bytes.extend_from_slice(data);
        Ok(())
    }

    /// The whole message, once every announced byte arrived.
    pub fn finish(self) -> Result<(Header, Vec<u8>), String> {
        if self.bytes.len() as u64 != self.header.total_bytes {
            return Err(format!("{} of the {} bytes announced arrived", self.bytes.len(), self.header.total_bytes));
        }
        Ok((self.header, self.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(total_bytes: u64) -> Header {
        Header { cluster_id: "c".into(), from: 1, to: 2, total_bytes }
    }

    #[test]
    fn chunks_reassemble_to_the_message_and_nothing_else() {
        let message: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let pieces = chunk(&message, 4096);
        assert_eq!(pieces.len(), 3);
        let mut reassembly = Reassembly::start(header(message.len() as u64)).expect("start");
        for piece in &pieces {
            reassembly.push(&header(message.len() as u64), piece).expect("push");
        }
        let (got_header, bytes) = reassembly.finish().expect("whole");
        assert_eq!((got_header, bytes), (header(10_000), message.clone()));
        assert_eq!(chunk(&[], 10).len(), 1, "an empty message is one empty chunk");

        // Short, long, mixed headers and absurd totals are refused.
        let mut short = Reassembly::start(header(10_000)).expect("start");
        short.push(&header(10_000), pieces[0]).expect("push");
        assert!(short.finish().expect_err("short").contains("4096 of the 10000"));
        let mut long = Reassembly::start(header(100)).expect("start");
        assert!(long.push(&header(100), &message[..101]).is_err());
        let mut mixed = Reassembly::start(header(10_000)).expect("start");
        let other = Header { from: 3, ..header(10_000) };
        assert!(mixed.push(&other, pieces[0]).expect_err("mixed").contains("differs"));
        assert!(Reassembly::start(header(SNAPSHOT_BYTES_MAX + 1)).is_err());
    }
}
