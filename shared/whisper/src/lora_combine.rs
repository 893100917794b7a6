//! Weighted combinations of adapters, as PEFT's `add_weighted_adapter` makes them:
//! - `Linear` (same rank and layers): with `k_i = w_i * scaling_i`,
//!   `A = sum(sign(k_i) sqrt(|k_i|) A_i)` and `B = sum(sqrt(|k_i|) B_i)`, rank unchanged. As in
//!   PEFT this is not the weighted sum of the deltas when there are several inputs (cross
//!   terms); with one input it is exactly `w` times it.
//! - `Cat` (same layers, any ranks): `A = [w_i * scaling_i * A_i]` stacked and the B side by
//!   side: exactly the weighted sum of the deltas, rank the sum of the ranks.
//!
//! The result has `lora_alpha = r` (scaling 1), as PEFT writes it.

use std::collections::BTreeMap;

use anyhow::{bail, ensure};
use tch::Tensor;

use crate::lora::{Adapter, LoraConfig, LoraWeights};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    Linear,
    Cat,
}

/// Combines `inputs` (adapter, weight) into a new adapter.
pub fn combine(inputs: &[(&Adapter, f64)], combination: Combination) -> anyhow::Result<Adapter> {
    let Some(((first, _), rest)) = inputs.split_first() else {
        bail!("no adapters to combine");
    };
    for (adapter, weight) in inputs {
        ensure!(weight.is_finite(), "weight {weight} is not finite");
        ensure!(
            adapter.biases.is_empty(),
            "adapters with trained biases cannot be combined"
        );
        ensure!(
            adapter.layers.keys().eq(first.layers.keys()),
            "the adapters adapt different layers"
        );
    }
    if combination == Combination::Linear {
        for (adapter, _) in rest {
            ensure!(
                adapter.config.r == first.config.r,
                "LINEAR needs one rank, got {} and {}",
                first.config.r,
                adapter.config.r
            );
        }
    }
    let mut layers = BTreeMap::new();
    for name in first.layers.keys() {
        let parts: Vec<(&LoraWeights, f64, f64)> = inputs
            .iter()
            .map(|(a, w)| (&a.layers[name], *w, a.config.scaling()))
            .collect();
        let weights = match combination {
            Combination::Linear => {
                let mut a = parts[0].0.a.zeros_like();
                let mut b = parts[0].0.b.zeros_like();
                for (lora, w, scaling) in &parts {
                    let k = w * scaling;
                    let root = k.abs().sqrt();
                    a += &lora.a * (if k >= 0.0 { root } else { -root });
                    b += &lora.b * root;
                }
                LoraWeights { a, b }
            }
            Combination::Cat => {
                let a: Vec<Tensor> = parts
                    .iter()
                    .map(|(l, w, scaling)| &l.a * (w * scaling))
                    .collect();
                let b: Vec<Tensor> = parts.iter().map(|(l, _, _)| l.b.detach()).collect();
                LoraWeights {
                    a: Tensor::cat(&a, 0),
                    b: Tensor::cat(&b, 1),
                }
            }
        };
        layers.insert(name.clone(), weights);
    }
    let r = match combination {
        Combination::Linear => first.config.r,
        Combination::Cat => inputs.iter().map(|(a, _)| a.config.r).sum(),
    };
    let config = LoraConfig {
        r,
        alpha: r as f64,
        use_rslora: false,
        ..first.config.clone()
    };
    Ok(Adapter::from_parts(config, layers, BTreeMap::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{LinearSite, LoraConfig};
    use tch::{Device, Kind};

    fn adapter(r: i64, alpha: f64, seed: i64) -> Adapter {
        tch::manual_seed(seed);
        let sites = [LinearSite {
            name: "model.encoder.layers.0.self_attn.q_proj".into(),
            in_dim: 8,
            out_dim: 6,
            bias: None,
            bias_only: false,
        }];
        let mut adapter = Adapter::init(
            LoraConfig {
                r,
                alpha,
                ..Default::default()
            },
            &sites,
            Device::Cpu,
        )
        .expect("init");
        for w in adapter.layers.values_mut() {
            w.b = Tensor::randn(w.b.size(), (Kind::Float, Device::Cpu));
        }
        adapter
    }

    fn delta(adapter: &Adapter) -> Tensor {
        let w = adapter.layers.values().next().expect("a layer");
        w.b.matmul(&w.a) * adapter.config.scaling()
    }

    #[test]
    fn cat_is_the_weighted_sum_of_the_deltas() {
        let (x, y) = (adapter(4, 64.0, 1), adapter(2, 8.0, 2));
        let merged = combine(&[(&x, 0.7), (&y, -0.3)], Combination::Cat).expect("cat");
        assert_eq!((merged.config.r, merged.config.alpha), (6, 6.0));
        let want = delta(&x) * 0.7 + delta(&y) * -0.3;
        let diff = (delta(&merged) - want).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn linear_of_one_adapter_scales_its_delta() {
        let x = adapter(4, 64.0, 3);
        for w in [1.0, 0.25, -0.5] {
            let merged = combine(&[(&x, w)], Combination::Linear).expect("linear");
            let diff = (delta(&merged) - delta(&x) * w)
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < 1e-4, "weight {w}: {diff}");
        }
        let y = adapter(2, 8.0, 4);
        assert!(combine(&[(&x, 1.0), (&y, 1.0)], Combination::Linear).is_err());
    }
}
