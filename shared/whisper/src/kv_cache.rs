//! The decoder's self-attention keys and values, grown in place step after step.
//!
//! Appending with `cat` copies the whole cache at every step, O(T²) over a window: at 448
//! tokens and batch 8 that is about 7 MB per tensor and layer, every step. Here the keys and
//! values live in a buffer with room to spare (doubled when full), each step writes only its
//! own positions, and attention reads a view of the filled part.

use tch::Tensor;

/// Keys and values `[B, H, T, hd]` of the tokens decoded so far.
#[derive(Debug)]
pub struct GrowingKv {
    keys: Tensor,
    values: Tensor,
    /// Filled positions along dim 2; the rest of the buffers is free room.
    len: i64,
}

/// Room allocated at the first append: enough for a short window without a reallocation.
const FIRST_ROOM: i64 = 64;

impl GrowingKv {
    /// A cache holding `keys`/`values` as they are (no copy: a teacher-forced pass through the
    /// whole sequence, as in training, never pays for the buffer or writes in place).
    pub fn new(keys: Tensor, values: Tensor) -> Self {
        let len = keys.size()[2];
        Self { keys, values, len }
    }

    /// Appends `keys`/`values` `[B, H, T_new, hd]` and returns views of all positions so far.
    pub fn append(&mut self, keys: &Tensor, values: &Tensor) -> (Tensor, Tensor) {
        let added = keys.size()[2];
        let room = self.keys.size()[2];
        if self.len + added > room {
            let wanted = (self.len + added).max(2 * room).max(FIRST_ROOM);
            self.keys = grown(&self.keys, self.len, wanted);
            self.values = grown(&self.values, self.len, wanted);
        }
        self.keys.narrow(2, self.len, added).copy_(keys);
        self.values.narrow(2, self.len, added).copy_(values);
        self.len += added;
        self.filled()
    }

    /// Views of the filled positions.
    pub fn filled(&self) -> (Tensor, Tensor) {
        (
            self.keys.narrow(2, 0, self.len),
            self.values.narrow(2, 0, self.len),
        )
    }

    /// Keeps the batch rows `indices` (beam reordering, finished rows leaving).
    pub fn select(&mut self, indices: &Tensor) {
        self.keys = self.keys.index_select(0, indices);
        self.values = self.values.index_select(0, indices);
    }
}

/// A buffer of `room` positions along dim 2 whose first `len` are `buffer`'s.
fn grown(buffer: &Tensor, len: i64, room: i64) -> Tensor {
    let mut size = buffer.size();
    size[2] = room;
    let bigger = Tensor::empty(size.as_slice(), (buffer.kind(), buffer.device()));
    bigger.narrow(2, 0, len).copy_(&buffer.narrow(2, 0, len));
    bigger
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn appends_equal_concatenation_across_growth_and_selection() {
        let options = (Kind::Float, tch::Device::Cpu);
        let first = (
            Tensor::randn([3, 2, 4, 5], options),
            Tensor::randn([3, 2, 4, 5], options),
        );
        let mut cache = GrowingKv::new(first.0.copy(), first.1.copy());
        let (mut keys, mut values) = first;
        let mut batch = 3;
        // 200 single steps cross the first room (64) and two doublings.
        for step in 0..200 {
            let added = if step % 50 == 0 { 3 } else { 1 };
            let k = Tensor::randn([batch, 2, added, 5], options);
            let v = Tensor::randn([batch, 2, added, 5], options);
            keys = Tensor::cat(&[keys, k.copy()], 2);
            values = Tensor::cat(&[values, v.copy()], 2);
            let (ck, cv) = cache.append(&k, &v);
            assert!(ck.equal(&keys) && cv.equal(&values), "step {step}");
            if step == 120 {
                let rows = Tensor::from_slice(&[2i64, 0]);
                cache.select(&rows);
                keys = keys.index_select(0, &rows);
                values = values.index_select(0, &rows);
                batch = 2;
            }
        }
        assert_eq!(cache.filled().0.size(), keys.size());
    }
}
