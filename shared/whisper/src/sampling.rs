//! Seeded sampling for decoding at a temperature. Each decoder row draws from its own
//! generator, seeded from the request's seed and the window's content, so that a window
//! decodes the same whatever else shares its batch, and concurrent requests (or threads)
//! cannot move each other's draws through libtorch's process-wide generator.

use tch::{Device, Kind, Tensor};

/// SplitMix64 (Steele, Lea and Flood): a tiny generator whose every seed gives a good stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    state: u64,
}

impl Sampler {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        finalize(self.state)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An index drawn with probability proportional to `weights` (NaN and negative entries
    /// count as 0). All-zero weights give index 0, so that a degenerate row still yields a
    /// token.
    pub fn pick(&mut self, weights: &[f32]) -> usize {
        let weight = |w: f32| if w > 0.0 { f64::from(w) } else { 0.0 };
        let total: f64 = weights.iter().map(|&w| weight(w)).sum();
        if total <= 0.0 {
            return 0;
        }
        let target = self.next_f64() * total;
        let mut running = 0.0;
        let mut last_positive = 0;
        for (i, &w) in weights.iter().enumerate() {
            let w = weight(w);
            if w > 0.0 {
                running += w;
                last_positive = i;
                if target < running {
                    return i;
                }
            }
        }
        // Rounding left the target at the very end.
        last_positive
    }
}

/// One token per row of `logits` (`[R, V]`) drawn from `softmax(logits / temperature)`;
/// row `r` draws from `samplers[rows[r]]`.
pub fn sample_tokens(
    logits: &Tensor,
    temperature: f64,
    samplers: &mut [Sampler],
    rows: &[usize],
) -> Vec<i64> {
    let vocab = logits.size().last().copied().unwrap_or(0).max(0) as usize;
    let probs = (logits.to_kind(Kind::Float) / temperature)
        .softmax(-1, Kind::Float)
        .to_device(Device::Cpu)
        .reshape([-1]);
    let probs = Vec::<f32>::try_from(&probs).unwrap_or_default();
    rows.iter()
        .enumerate()
        .map(|(r, &i)| {
            let weights = probs.get(r * vocab..(r + 1) * vocab).unwrap_or(&[]);
            samplers.get_mut(i).map_or(0, |s| s.pick(weights)) as i64
        })
        .collect()
}

/// SplitMix64's output function: a bijection that spreads every input bit.
fn finalize(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed derived from `seed` and `value` (order matters).
pub fn mix(seed: u64, value: u64) -> u64 {
    finalize(finalize(seed ^ 0x6A09_E667_F3BC_C908).wrapping_add(value))
}

/// The seed of one window: the request's seed mixed with the window's values, so that the
/// same audio with the same seed samples the same tokens.
pub fn window_seed(seed: u64, window: &[f32]) -> u64 {
    // FNV-1a-style over the bits (cheap for a 1 MB window), then mixed with the seed.
    let digest = window.iter().fold(0xCBF2_9CE4_8422_2325u64, |acc, &v| {
        (acc ^ u64::from(v.to_bits())).wrapping_mul(0x0000_0100_0000_01B3)
    });
    mix(mix(seed, window.len() as u64), digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_follow_the_weights_and_repeat_with_the_seed() {
        let weights = [0.0f32, 0.1, 0.0, 0.6, 0.3, f32::NAN, -1.0];
        let mut sampler = Sampler::new(7);
        let mut counts = [0usize; 7];
        let draws = 100_000;
        for _ in 0..draws {
            counts[sampler.pick(&weights)] += 1;
        }
        for (i, expected) in [(1, 0.1), (3, 0.6), (4, 0.3)] {
            let share = counts[i] as f64 / draws as f64;
            assert!((share - expected).abs() < 0.01, "index {i}: {share}");
        }
        assert_eq!(counts[0] + counts[2] + counts[5] + counts[6], 0);

        let sequence = |seed| {
            let mut s = Sampler::new(seed);
            (0..32).map(|_| s.pick(&weights)).collect::<Vec<_>>()
        };
        assert_eq!(sequence(3), sequence(3));
        assert_ne!(sequence(3), sequence(4));
        assert_eq!(Sampler::new(1).pick(&[0.0, 0.0]), 0);
        assert_eq!(Sampler::new(1).pick(&[]), 0);
    }

    #[test]
    fn sampled_tokens_follow_the_softmax_of_each_row() {
        // Row 0: probabilities 0.2 / 0 / 0.6 / 0.2 at temperature 1; row 1 is twice as sharp
        // at temperature 0.5: 1/11 / 0 / 9/11 / 1/11.
        let row = [0.0f32, f32::NEG_INFINITY, 3f32.ln(), 0.0];
        let logits = Tensor::from_slice(&row).view([1, 4]);
        let mut samplers = vec![Sampler::new(1), Sampler::new(2)];
        let draws = 20_000;
        let shares = |samplers: &mut [Sampler], temperature: f64, rows: &[usize]| {
            let mut counts = [0usize; 4];
            for _ in 0..draws {
                for token in sample_tokens(
                    &logits.repeat([rows.len() as i64, 1]),
                    temperature,
                    samplers,
                    rows,
                ) {
                    counts[token as usize] += 1;
                }
            }
            counts.map(|c| c as f64 / (draws * rows.len()) as f64)
        };
        // A batch of one (a 2-D `[1, V]` tensor) and of two.
        for (got, want) in shares(&mut samplers, 1.0, &[0])
            .iter()
            .zip([0.2, 0.0, 0.6, 0.2])
        {
            assert!((got - want).abs() < 0.015, "{got} vs {want}");
        }
        for (got, want) in shares(&mut samplers, 0.5, &[1, 0]).iter().zip([
            1.0 / 11.0,
            0.0,
            9.0 / 11.0,
            1.0 / 11.0,
        ]) {
            assert!((got - want).abs() < 0.015, "{got} vs {want}");
        }
        // Each row uses its own generator: the same seeds give the same draws.
        let pair = |seeds: [u64; 2]| {
            let mut samplers = seeds.map(Sampler::new).to_vec();
            (0..16)
                .flat_map(|_| sample_tokens(&logits.repeat([2, 1]), 1.0, &mut samplers, &[0, 1]))
                .collect::<Vec<_>>()
        };
        assert_eq!(pair([5, 6]), pair([5, 6]));
        let alone: Vec<i64> = {
            let mut samplers = vec![Sampler::new(6)];
            (0..16)
                .flat_map(|_| sample_tokens(&logits, 1.0, &mut samplers, &[0]))
                .collect()
        };
        let second: Vec<i64> = pair([5, 6]).into_iter().skip(1).step_by(2).collect();
        assert_eq!(second, alone);
    }

    #[test]
    fn window_seeds_follow_content_and_request_seed() {
        let a = vec![0.25f32; 1000];
        let mut b = a.clone();
        b[999] = 0.5;
        assert_eq!(window_seed(0, &a), window_seed(0, &a.clone()));
        assert_ne!(window_seed(0, &a), window_seed(0, &b));
        assert_ne!(window_seed(0, &a), window_seed(1, &a));
        assert_ne!(mix(1, 2), mix(2, 1));
        let unit = Sampler::new(9).next_f64();
        assert!((0.0..1.0).contains(&unit));
    }
}
