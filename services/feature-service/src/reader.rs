//! A blocking `Read` over the audio bytes of a gRPC stream, so the (blocking, pull-based)
//! decoders can run on a blocking thread while tonic feeds them.

use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::error::FeatureError;

/// Why the inbound stream stopped early, if it did: set by the task forwarding the stream,
/// read by the pipeline's owner to report the real cause instead of an I/O error.
#[derive(Debug, Default, Clone)]
pub struct AbortSlot(Arc<Mutex<Option<FeatureError>>>);

impl AbortSlot {
    pub fn set(&self, err: FeatureError) {
        if let Ok(mut slot) = self.0.lock() {
            slot.get_or_insert(err);
        }
    }

    pub fn take(&self) -> Option<FeatureError> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }

    fn is_set(&self) -> bool {
        self.0.lock().map(|slot| slot.is_some()).unwrap_or(true)
    }
}

/// Reads the chunks sent on a bounded channel, in order. The end of the channel is the end
/// of the audio, unless the [`AbortSlot`] says the stream failed.
pub struct ChannelReader {
    chunks: mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    position: usize,
    abort: AbortSlot,
}

impl ChannelReader {
    pub fn new(chunks: mpsc::Receiver<Vec<u8>>, abort: AbortSlot) -> Self {
        Self {
            chunks,
            current: Vec::new(),
            position: 0,
            abort,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.position == self.current.len() {
            match self.chunks.blocking_recv() {
                Some(chunk) => {
                    self.current = chunk;
                    self.position = 0;
                }
                None if self.abort.is_set() => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "input stream aborted",
                    ))
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.position);
        buf[..n].copy_from_slice(&self.current[self.position..self.position + n]);
        self.position += n;
        Ok(n)
    }
}
