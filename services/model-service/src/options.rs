//! Validation at the boundary: a stream's `TranscriptionOptions` into typed decoding settings,
//! every violation an INVALID_ARGUMENT naming the field's path in the request.

use asr_proto::v1 as pb;
use asr_whisper::{DecodeOptions, FallbackOptions, Task};

use crate::error::ModelError;

/// Largest beam_size / best_of accepted (ModelLimits.max_beam_size).
pub const MAX_BEAM_SIZE: u32 = 16;
/// Decoder context of every Whisper size.
const MAX_TARGET_POSITIONS: u32 = 448;

/// A Transcribe stream's settings, validated.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub decode: DecodeOptions,
    /// Registry name of the adapter and its scale.
    pub adapter: Option<AdapterChoice>,
    /// Audio seconds between partial re-decodes; `None`: no partial results.
    pub partial_interval_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdapterChoice {
    pub name: String,
    pub scale: f64,
}

/// What the model knows, for checks that depend on it.
pub struct ModelFacts<'a> {
    pub languages: &'a [String],
    pub vocab_size: u32,
}

/// A stream's `config.n_mels` (0 = 80) checked against the model's mel bins.
pub fn check_n_mels(requested: u32, model_n_mels: usize) -> Result<usize, ModelError> {
    let n_mels = if requested == 0 {
        80
    } else {
        requested as usize
    };
    if n_mels != model_n_mels {
        return Err(ModelError::invalid(
            "config.n_mels",
            format!("{n_mels}: this model takes {model_n_mels} mel bins"),
        ));
    }
    Ok(n_mels)
}

const OPTIONS: &str = "config.options";

fn field(name: &str) -> String {
    format!("{OPTIONS}.{name}")
}

fn check_range(name: &str, value: f32, lo: f32, hi: f32) -> Result<f64, ModelError> {
    if value.is_finite() && (lo..=hi).contains(&value) {
        Ok(f64::from(value))
    } else {
        Err(ModelError::invalid(
            field(name),
            format!("must be within {lo}..={hi}, got {value}"),
        ))
    }
}

impl StreamOptions {
    pub fn from_proto(
        options: Option<pb::TranscriptionOptions>,
        model: &ModelFacts<'_>,
    ) -> Result<Self, ModelError> {
        let options = options.unwrap_or_default();
        let language = match options.language.trim() {
            "" => None,
            code if model.languages.iter().any(|l| l == code) => Some(code.to_string()),
            code => {
                return Err(ModelError::invalid(
                    field("language"),
                    format!(
                        "{code:?} is not a language this model knows (see ModelInfo.languages)"
                    ),
                ))
            }
        };
        let task = match pb::Task::try_from(options.task) {
            Ok(pb::Task::Unspecified | pb::Task::Transcribe) => Task::Transcribe,
            Ok(pb::Task::Translate) => Task::Translate,
            Err(_) => {
                return Err(ModelError::invalid(
                    field("task"),
                    format!("unknown task {}", options.task),
                ))
            }
        };
        if let Some(limit) = options.max_initial_timestamp_seconds {
            if limit != 1.0 {
                return Err(ModelError::invalid(
                    field("max_initial_timestamp_seconds"),
                    "only the default 1.0 is supported by this version",
                ));
            }
        }
        let decoding = decoding_options(options.decoding.unwrap_or_default(), model)?;
        let adapter = match options.adapter.trim() {
            "" => None,
            name => {
                crate::registry::validate_name(name, "config.options.adapter")?;
                let scale = match options.adapter_scale {
                    Some(scale) => check_range("adapter_scale", scale, 0.0, 1.0)?,
                    None => 1.0,
                };
                Some(AdapterChoice {
                    name: name.to_string(),
                    scale,
                })
            }
        };
        let partial_interval_seconds = if options.partial_results {
            Some(match options.partial_interval_seconds {
                Some(v) => check_range("partial_interval_seconds", v, 0.2, 30.0)?,
                None => 1.0,
            })
        } else {
            None
        };
        let initial_prompt =
            Some(options.initial_prompt.trim().to_string()).filter(|p| !p.is_empty());
        Ok(Self {
            decode: DecodeOptions {
                language,
                task,
                timestamps: options.timestamps,
                initial_prompt,
                condition_on_previous_text: options.condition_on_previous_text.unwrap_or(true),
                ..decoding
            },
            adapter,
            partial_interval_seconds,
        })
    }
}

/// `DecodingOptions` into the decoding half of [`DecodeOptions`].
fn decoding_options(
    decoding: pb::DecodingOptions,
    model: &ModelFacts<'_>,
) -> Result<DecodeOptions, ModelError> {
    let name = |f: &str| format!("decoding.{f}");
    let beam_size = match decoding.beam_size {
        None => 1,
        Some(beam) if (1..=MAX_BEAM_SIZE).contains(&beam) => beam,
        Some(beam) => {
            return Err(ModelError::invalid(
                field(&name("beam_size")),
                format!("1 (greedy) to {MAX_BEAM_SIZE} (ModelLimits.max_beam_size), got {beam}"),
            ))
        }
    };
    if decoding.best_of > MAX_BEAM_SIZE {
        return Err(ModelError::invalid(
            field(&name("best_of")),
            format!("at most {MAX_BEAM_SIZE}, got {}", decoding.best_of),
        ));
    }
    let patience = match decoding.patience {
        Some(p) if !(p.is_finite() && p > 0.0) => {
            return Err(ModelError::invalid(
                field(&name("patience")),
                format!("must be > 0, got {p}"),
            ))
        }
        Some(p) => f64::from(p),
        None => 1.0,
    };
    let length_penalty = decoding
        .length_penalty
        .map(|v| check_range(&name("length_penalty"), v, 0.0, 2.0))
        .transpose()?;
    let first = match decoding.temperature {
        Some(t) => check_range(&name("temperature"), t, 0.0, 1.0)?,
        None => 0.0,
    };
    let mut temperatures = vec![first];
    if !decoding.temperature_fallback.is_empty() {
        if decoding.temperature_increment.is_some() {
            return Err(ModelError::invalid(
                field(&name("temperature_fallback")),
                "set either temperature_increment or temperature_fallback, not both",
            ));
        }
        if decoding.temperature_fallback.len() > 10 {
            return Err(ModelError::invalid(
                field(&name("temperature_fallback")),
                "at most 10 temperatures",
            ));
        }
        for &t in &decoding.temperature_fallback {
            temperatures.push(check_range(&name("temperature_fallback"), t, 0.0, 1.0)?);
        }
    } else {
        let step = match decoding.temperature_increment {
            Some(s) => check_range(&name("temperature_increment"), s, 0.0, 1.0)?,
            None => 0.2,
        };
        if step > 0.0 {
            let mut k = 1;
            // Rounded as openai's np.arange(t, 1.0 + 1e-6, step) gives them.
            while first + step * f64::from(k) <= 1.0 + 1e-6 {
                let t = first + step * f64::from(k);
                temperatures.push((t * 1e6).round() / 1e6);
                k += 1;
            }
        }
    }
    let compression_ratio_threshold = match decoding.compression_ratio_threshold {
        Some(v) if v.is_nan() || v < 0.0 => {
            return Err(ModelError::invalid(
                field(&name("compression_ratio_threshold")),
                format!("must be >= 0, got {v}"),
            ))
        }
        Some(0.0) => None,
        Some(v) => Some(f64::from(v)),
        None => Some(2.4),
    };
    let logprob_threshold = match decoding.log_prob_threshold {
        Some(v) if v.is_nan() => {
            return Err(ModelError::invalid(
                field(&name("log_prob_threshold")),
                "must be a number (-Infinity disables it)",
            ))
        }
        Some(v) if v == f32::NEG_INFINITY => None,
        Some(v) => Some(f64::from(v)),
        None => Some(-1.0),
    };
    let no_speech_threshold = match decoding.no_speech_threshold {
        Some(v) => {
            Some(check_range(&name("no_speech_threshold"), v, 0.0, 1.0)?).filter(|&v| v < 1.0)
        }
        None => Some(0.6),
    };
    if decoding.suppress_blank == Some(false) {
        return Err(ModelError::invalid(
            field(&name("suppress_blank")),
            "turning blank suppression off is not supported by this version",
        ));
    }
    if decoding.suppress_non_speech_tokens == Some(false) {
        return Err(ModelError::invalid(
            field(&name("suppress_non_speech_tokens")),
            "turning non-speech suppression off is not supported by this version",
        ));
    }
    if let Some(&id) = decoding
        .suppress_tokens
        .iter()
        .find(|&&id| id >= model.vocab_size)
    {
        return Err(ModelError::invalid(
            field(&name("suppress_tokens")),
            format!(
                "token id {id} is outside the vocabulary ({})",
                model.vocab_size
            ),
        ));
    }
    if !decoding.suppress_tokens.is_empty() {
        return Err(ModelError::invalid(
            field(&name("suppress_tokens")),
            "extra suppressed tokens are not supported by this version",
        ));
    }
    let max_new_tokens = match decoding.max_new_tokens {
        0 => 224,
        n => n.min(MAX_TARGET_POSITIONS),
    } as usize;
    Ok(DecodeOptions {
        beam_size: beam_size as usize,
        patience,
        length_penalty,
        max_new_tokens,
        fallback: FallbackOptions {
            temperatures,
            best_of: match decoding.best_of {
                0 => 5,
                n => n as usize,
            },
            compression_ratio_threshold,
            logprob_threshold,
            no_speech_threshold,
            seed: decoding.seed,
        },
        ..DecodeOptions::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> (Vec<String>, u32) {
        (vec!["en".into(), "zh".into()], 51865)
    }

    fn parse(options: pb::TranscriptionOptions) -> Result<StreamOptions, ModelError> {
        let (languages, vocab_size) = facts();
        StreamOptions::from_proto(
            Some(options),
            &ModelFacts {
                languages: &languages,
                vocab_size,
            },
        )
    }

    fn field_of(err: ModelError) -> String {
        match err {
            ModelError::InvalidField { field, .. } => field,
            other => panic!("expected an invalid field, got {other}"),
        }
    }

    #[test]
    fn defaults_are_openai_transcribe() {
        let options = parse(Default::default()).expect("defaults");
        let d = &options.decode;
        assert_eq!(d.language, None);
        assert_eq!(d.beam_size, 1);
        assert_eq!(d.max_new_tokens, 224);
        assert_eq!(d.fallback.temperatures, vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_eq!(d.fallback, FallbackOptions::default());
        assert!(d.condition_on_previous_text);
        assert!(options.adapter.is_none());
        assert!(options.partial_interval_seconds.is_none());
    }

    #[test]
    fn bad_fields_are_named() {
        let err = parse(pb::TranscriptionOptions {
            language: "xx".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(field_of(err), "config.options.language");
        for beam in [0, 99] {
            let err = parse(pb::TranscriptionOptions {
                decoding: Some(pb::DecodingOptions {
                    beam_size: Some(beam),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .unwrap_err();
            assert_eq!(field_of(err), "config.options.decoding.beam_size");
        }
        let err = parse(pb::TranscriptionOptions {
            adapter: "../etc".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(field_of(err), "config.options.adapter");
        let err = parse(pb::TranscriptionOptions {
            adapter: "mine".into(),
            adapter_scale: Some(1.5),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(field_of(err), "config.options.adapter_scale");
    }

    #[test]
    fn explicit_fallback_and_no_fallback() {
        let options = parse(pb::TranscriptionOptions {
            decoding: Some(pb::DecodingOptions {
                temperature_increment: Some(0.0),
                ..Default::default()
            }),
            ..Default::default()
        })
        .expect("no fallback");
        assert_eq!(options.decode.fallback.temperatures, vec![0.0]);
        let options = parse(pb::TranscriptionOptions {
            decoding: Some(pb::DecodingOptions {
                temperature_fallback: vec![0.5, 1.0],
                ..Default::default()
            }),
            ..Default::default()
        })
        .expect("explicit");
        assert_eq!(options.decode.fallback.temperatures, vec![0.0, 0.5, 1.0]);
    }
}
