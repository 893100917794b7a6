//! LoRA dropout masks on the CPU from a counter-based hash.
//!
//! libtorch's CPU `bernoulli_` drew about 6 ns a value: the recipe's masks (q and v inputs of
//! every attention, 55M values a step at batch 4 on whisper-base) took 0.3 s of a 6 s step.
//! Here a mask value is a hash of the micro-batch's key and the value's position in the
//! micro-batch's stream of draws, computed on libtorch's threads. The masks are those of PEFT's
//! `nn.Dropout`: each input kept with probability 1 - p and scaled by 1 / (1 - p). They depend
//! only on the key and the order of the calls, so a resumed run draws the same ones; the
//! stream is per thread, so trainers on different threads do not disturb each other.
//! Tensors on other devices use libtorch's dropout (seeded by the trainer as before).

use std::cell::Cell;

use tch::{Device, Kind, Tensor};

use crate::sampling::mix;

thread_local! {
    /// (key, next counter) of this thread's stream of draws.
    static STREAM: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Starts a stream of draws: the trainer calls it before each micro-batch with a key made from
/// its seed and the micro-batch's position.
pub fn seed_dropout(key: u64) {
    STREAM.with(|stream| stream.set((key, 0)));
}

/// Reserves `count` draws of this thread's stream: its key and the first counter.
fn reserve(count: u64) -> (u64, u64) {
    STREAM.with(|stream| {
        let (key, next) = stream.get();
        stream.set((key, next.wrapping_add(count)));
        (key, next)
    })
}

/// Values with 24 random bits below this are dropped.
fn drop_threshold(p: f64) -> u32 {
    (p * f64::from(1u32 << 24)).round() as u32
}

/// The mask value of draw `counter`: 0 (dropped) or `kept`.
#[inline]
fn mask_value(key: u64, counter: u64, threshold: u32, kept: f32) -> f32 {
    let bits = (mix(key, counter) >> 40) as u32;
    if bits < threshold {
        0.0
    } else {
        kept
    }
}

/// `xs` with each value zeroed with probability `p` and the rest scaled by `1 / (1 - p)`
/// (`nn.Dropout` in training), differentiable with respect to `xs`.
pub fn dropout(xs: &Tensor, p: f64) -> Tensor {
    if p <= 0.0 {
        return xs.shallow_clone();
    }
    if xs.device() != Device::Cpu || p >= 1.0 {
        return xs.dropout(p, true);
    }
    xs * mask(&xs.size(), p)
}

/// Where a mask's values come from: draws `first..` of the stream `key`.
#[derive(Clone, Copy)]
struct Draws {
    key: u64,
    first: u64,
    threshold: u32,
    kept: f32,
}

/// Writes the mask values on up to `threads` threads (the values do not depend on how many).
fn fill(values: &mut [f32], draws: Draws, threads: usize) {
    let threads = threads.clamp(1, values.len().div_ceil(1 << 16).max(1));
    let chunk = values.len().div_ceil(threads).max(1);
    let Draws {
        key,
        first,
        threshold,
        kept,
    } = draws;
    std::thread::scope(|scope| {
        for (index, part) in values.chunks_mut(chunk).enumerate() {
            let start = first.wrapping_add((index * chunk) as u64);
            scope.spawn(move || {
                for (offset, value) in part.iter_mut().enumerate() {
                    *value = mask_value(key, start.wrapping_add(offset as u64), threshold, kept);
                }
            });
        }
    });
}

/// A float mask of `shape` from this thread's stream.
fn mask(shape: &[i64], p: f64) -> Tensor {
    let mask = Tensor::empty(shape, (Kind::Float, Device::Cpu));
    let count = mask.numel();
    let (key, first) = reserve(count as u64);
    let threshold = drop_threshold(p);
    let kept = (1.0 / (1.0 - p)) as f32;
    if count == 0 {
        return mask;
    }
    // SAFETY: a fresh contiguous float tensor of `count` values, written only here and owned
    // by `mask`, which outlives the slice.
    let values = unsafe { std::slice::from_raw_parts_mut(mask.data_ptr() as *mut f32, count) };
    let threads = tch::get_num_threads().max(1) as usize;
    fill(
        values,
        Draws {
            key,
            first,
            threshold,
            kept,
        },
        threads,
    );
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_one_minus_p_scaled_and_repeat_with_the_key() {
        let xs = Tensor::ones([300, 1000], (Kind::Float, Device::Cpu));
        seed_dropout(7);
        let first = dropout(&xs, 0.05);
        let second = dropout(&xs, 0.05);
        let kept = first
            .ne(0.0)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!((kept - 0.95).abs() < 0.002, "kept share {kept}");
        let scale = first.max().double_value(&[]);
        assert!(
            (scale - 1.0 / 0.95).abs() < 1e-6,
            "kept values scaled by {scale}"
        );
        // Later draws of the stream differ; the same key gives the same masks again.
        assert!(!first.equal(&second));
        seed_dropout(7);
        assert!(dropout(&xs, 0.05).equal(&first));
        assert!(dropout(&xs, 0.05).equal(&second));
        seed_dropout(8);
        assert!(!dropout(&xs, 0.05).equal(&first));
    }

    #[test]
    fn masks_do_not_depend_on_the_thread_count() {
        let draws = Draws {
            key: 3,
            first: 5,
            threshold: drop_threshold(0.3),
            kept: 1.0 / 0.7,
        };
        let mut one = vec![0.0f32; 210_003];
        let mut four = vec![1.0f32; 210_003];
        fill(&mut one, draws, 1);
        fill(&mut four, draws, 4);
        assert_eq!(one, four);
    }

    #[test]
    fn gradients_follow_the_mask() {
        let xs = Tensor::randn([64, 32], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        seed_dropout(11);
        let ys = dropout(&xs, 0.5);
        ys.sum(Kind::Float).backward();
        // d(sum)/dx is the mask itself: 0 where dropped, 2 where kept.
        let expected = ys.detach().ne(0.0).to_kind(Kind::Float) * 2.0;
        assert!(xs.grad().allclose(&expected, 0.0, 1e-6, false));
    }
}
