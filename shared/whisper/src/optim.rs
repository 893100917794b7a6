//! The optimiser side of the recipe's Seq2SeqTrainer: AdamW as `torch.optim.AdamW` (betas 0.9
//! and 0.999, eps 1e-8, decoupled weight decay, bias correction), HF's linear schedule with
//! warmup, and gradient clipping by the global norm (`clip_grad_norm_`).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The recipe's: lr 1e-3, HF Trainer's AdamW defaults, no weight decay.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over a fixed list of parameters (their order is the state's order).
pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<Tensor>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Steps taken.
    pub step: i64,
}

impl AdamW {
    pub fn new(params: Vec<Tensor>, config: AdamWConfig) -> Self {
        let zeros = |p: &Tensor| p.zeros_like().detach();
        Self {
            exp_avg: params.iter().map(zeros).collect(),
            exp_avg_sq: params.iter().map(zeros).collect(),
            params,
            config,
            step: 0,
        }
    }

    /// Zeroes the parameters' gradients.
    pub fn zero_grad(&mut self) {
        for p in &self.params {
            let mut grad = p.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
    }

    /// One update at learning rate `lr` (the schedule's value for this step).
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2 = 1.0 - c.beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for ((p, m), v) in self
                .params
                .iter()
                .zip(&mut self.exp_avg)
                .zip(&mut self.exp_avg_sq)
            {
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                if c.weight_decay != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = m.g_mul_scalar_(c.beta1).g_add_(&(&grad * (1.0 - c.beta1)));
                let _ = v
                    .g_mul_scalar_(c.beta2)
                    .g_add_(&(&grad * &grad * (1.0 - c.beta2)));
                let denom = (v.sqrt() / bias2.sqrt()) + c.eps;
                let update = &*m / &denom * (lr / bias1);
                let _ = p.g_sub_(&update);
            }
        });
    }

    /// The optimiser state, named for a checkpoint: `exp_avg.{i}`, `exp_avg_sq.{i}`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let named = |prefix: &str, ts: &[Tensor]| -> Vec<(String, Tensor)> {
            ts.iter()
                .enumerate()
                .map(|(i, t)| (format!("{prefix}.{i}"), t.shallow_clone()))
                .collect()
        };
        let mut state = named("exp_avg", &self.exp_avg);
        state.extend(named("exp_avg_sq", &self.exp_avg_sq));
        state
    }

    /// Restores [`Self::state`] and the step count.
    pub fn load_state(&mut self, state: &[(String, Tensor)], step: i64) -> anyhow::Result<()> {
        let find = |name: &str| {
            state
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| anyhow::anyhow!("optimizer state lacks {name}"))
        };
        tch::no_grad(|| -> anyhow::Result<()> {
            for (i, (m, v)) in self
                .exp_avg
                .iter_mut()
                .zip(self.exp_avg_sq.iter_mut())
                .enumerate()
            {
                m.copy_(find(&format!("exp_avg.{i}"))?);
                v.copy_(find(&format!("exp_avg_sq.{i}"))?);
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

/// HF's `get_linear_schedule_with_warmup`: the learning rate rises linearly over `warmup`
/// steps, then falls linearly to 0 at `total` steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearSchedule {
    pub base_lr: f64,
    pub warmup: i64,
    pub total: i64,
}

impl LinearSchedule {
    /// The learning rate of the update after `step` updates.
    pub fn lr(&self, step: i64) -> f64 {
        let factor = if step < self.warmup {
            step as f64 / self.warmup.max(1) as f64
        } else {
            ((self.total - step) as f64 / (self.total - self.warmup).max(1) as f64).max(0.0)
        };
        self.base_lr * factor
    }
}

/// Scales the gradients of `params` so that their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does; returns the norm before clipping.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads
            .iter()
            .map(|g| g.norm().to_kind(Kind::Double))
            .collect();
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        let coefficient = max_norm / (total + 1e-6);
        if coefficient < 1.0 {
            for g in &grads {
                let _ = g.shallow_clone().g_mul_scalar_(coefficient);
            }
        }
        total
    })
}

/// Dynamic loss scaling for fp16 training, as torch.amp's `GradScaler` with its defaults:
/// the loss is multiplied by `scale` before backward; gradients are divided by it again and
/// checked; a step whose gradients overflowed is skipped and halves the scale, and 2000
/// clean steps in a row double it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradScaler {
    pub scale: f64,
    /// Clean steps since the last change of scale.
    pub growth_tracker: i64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: i64,
}

impl Default for GradScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_tracker: 0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

impl GradScaler {
    /// Divides the gradients of `params` by the scale; true when any is not finite (the
    /// step must then be skipped).
    pub fn unscale(&self, params: &[Tensor]) -> bool {
        tch::no_grad(|| {
            let mut found_inf = false;
            for g in params.iter().map(Tensor::grad).filter(Tensor::defined) {
                let _ = g.shallow_clone().g_mul_scalar_(1.0 / self.scale);
                found_inf |= !bool::try_from(g.isfinite().all()).unwrap_or(false);
            }
            found_inf
        })
    }

    /// The scale for the next step.
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker >= self.growth_interval {
                self.scale *= self.growth_factor;
                self.growth_tracker = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn linear_schedule_matches_hf() {
        let s = LinearSchedule {
            base_lr: 1e-3,
            warmup: 10,
            total: 110,
        };
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 5e-4).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr(60) - 5e-4).abs() < 1e-12);
        assert_eq!(s.lr(110), 0.0);
        let flat = LinearSchedule {
            base_lr: 1e-3,
            warmup: 0,
            total: 4,
        };
        assert_eq!(flat.lr(0), 1e-3);
        assert_eq!(flat.lr(2), 5e-4);
    }

    #[test]
    fn first_adamw_step_moves_each_weight_by_lr() {
        // With bias correction, the first step is lr * g / (|g| + eps): a step of lr.
        let p = Tensor::from_slice(&[1.0f32, -2.0, 3.0]).set_requires_grad(true);
        let mut opt = AdamW::new(vec![p.shallow_clone()], AdamWConfig::default());
        (&p * Tensor::from_slice(&[0.5f32, -4.0, 1e-3]))
            .sum(Kind::Float)
            .backward();
        opt.step(0.1);
        let moved = Vec::<f32>::try_from(&p.detach()).expect("values");
        assert!((moved[0] - 0.9).abs() < 1e-5);
        assert!((moved[1] + 1.9).abs() < 1e-5);
        assert!((moved[2] - 2.9).abs() < 1e-4);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let a = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::zeros([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&a * Tensor::from_slice(&[3.0f32, 0.0]) + 0.0)
            .sum(Kind::Float)
            .backward();
        (&b * Tensor::from_slice(&[4.0f32]))
            .sum(Kind::Float)
            .backward();
        let norm = clip_grad_norm(&[a.shallow_clone(), b.shallow_clone()], 1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        let clipped = (a.grad().norm().double_value(&[]).powi(2)
            + b.grad().norm().double_value(&[]).powi(2))
        .sqrt();
        assert!((clipped - 1.0).abs() < 1e-5);
    }

    #[test]
    fn the_scaler_skips_overflowing_steps_and_adapts_its_scale() {
        let p = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (p.sum(Kind::Float) * 65536.0 * 2.0).backward();
        let mut scaler = GradScaler {
            growth_interval: 2,
            ..Default::default()
        };
        assert!(!scaler.unscale(std::slice::from_ref(&p)));
        assert_eq!(Vec::<f32>::try_from(&p.grad()).expect("grad"), vec![2.0; 3]);
        scaler.update(false);
        scaler.update(false);
        assert_eq!((scaler.scale, scaler.growth_tracker), (131072.0, 0));
        let q = Tensor::from_slice(&[1.0f32, f32::INFINITY]).set_requires_grad(true);
        (&q * &q).sum(Kind::Float).backward();
        assert!(scaler.unscale(std::slice::from_ref(&q)));
        scaler.update(true);
        assert_eq!((scaler.scale, scaler.growth_tracker), (65536.0, 0));
    }
}
