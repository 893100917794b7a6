//! Reading choices out of the fuzzer's bytes: a missing byte reads as zero, so every input
//! maps to some choice and short inputs are still useful.

pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// One of `table`, or (for the index past its end) an arbitrary `u32` from the input.
    pub fn pick_or_any(&mut self, table: &[u32]) -> u32 {
        let index = usize::from(self.u8()) % (table.len() + 1);
        match table.get(index) {
            Some(&value) => value,
            None => self.u32(),
        }
    }

    /// Chunk sizes for streaming the rest of the input: a short cycle of sizes from 1 byte
    /// up to 64 KiB, so both tiny and large pushes (and a carry across them) are exercised.
    pub fn chunk_sizes(&mut self) -> Vec<usize> {
        let count = 1 + usize::from(self.u8() % 4);
        (0..count)
            .map(|_| {
                let b = usize::from(self.u8());
                match b % 4 {
                    0 => 1 + b / 4,
                    1 => 1 + (b / 4) * 7,
                    2 => 160 * (1 + b / 4),
                    _ => 1024 * (1 + b / 4),
                }
            })
            .collect()
    }

    pub fn rest(self) -> &'a [u8] {
        self.data
    }
}

/// Splits `data` into consecutive chunks whose sizes cycle through `sizes` (all >= 1).
pub fn chunks<'a, T>(data: &'a [T], sizes: &[usize]) -> impl Iterator<Item = &'a [T]> + 'a {
    let sizes: Vec<usize> = sizes.iter().map(|&s| s.max(1)).collect();
    let mut at = 0;
    let mut next = 0;
    std::iter::from_fn(move || {
        if at >= data.len() {
            return None;
        }
        let size = sizes.get(next % sizes.len().max(1)).copied().unwrap_or(1);
        next += 1;
        let end = (at + size).min(data.len());
        let chunk = &data[at..end];
        at = end;
        Some(chunk)
    })
}

/// Little-endian f32 bit patterns, NaN and infinities included.
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}
