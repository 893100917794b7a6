//! The HF files beside model.safetensors: config.json, generation_config.json, tokenizer and
//! feature-extractor files, from the CTranslate2 directory's config.json (`lang_ids`,
//! `suppress_ids`, `suppress_ids_begin`, `alignment_heads`) and tokenizer.json (the special
//! tokens' ids, checked against vocabulary.txt / vocabulary.json); and the staging directory
//! that is renamed into place when everything is written.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};

use crate::config::WhisperConfig;

/// Special tokens, languages and suppression lists of a CTranslate2 Whisper directory.
pub(super) struct Specials {
    tokenizer_text: String,
    tokenizer: Value,
    tokens: Tokens,
    eot: i64,
    sot: i64,
    sot_prev: i64,
    no_timestamps: i64,
    transcribe: i64,
    translate: i64,
    lang_to_id: Map<String, Value>,
    suppress: Vec<i64>,
    begin_suppress: Vec<i64>,
    alignment_heads: Value,
}

impl Specials {
    /// Reads `src`'s tokenizer.json and config.json for a model of `config`'s shape.
    pub(super) fn read(src: &Path, config: &WhisperConfig) -> Result<Self> {
        let ct2_config: Value = match std::fs::read_to_string(src.join("config.json")) {
            Ok(text) => serde_json::from_str(&text).context("parsing config.json")?,
            Err(_) => json!({}),
        };
        let tokenizer_text = std::fs::read_to_string(src.join("tokenizer.json"))
            .with_context(|| format!("reading {}/tokenizer.json", src.display()))?;
        let tokenizer: Value =
            serde_json::from_str(&tokenizer_text).context("parsing tokenizer.json")?;
        let tokens = Tokens::read(&tokenizer)?;
        let vocab = config.vocab_size;
        let eot = tokens.id("<|endoftext|>")?;
        let sot = tokens.id("<|startoftranscript|>")?;
        let no_timestamps = tokens.id("<|notimestamps|>")?;
        let (transcribe, translate) = (tokens.id("<|transcribe|>")?, tokens.id("<|translate|>")?);
        let sot_prev = tokens.id("<|startofprev|>")?;
        ensure!(
            no_timestamps < vocab as i64,
            "<|notimestamps|> = {no_timestamps} is outside the vocabulary ({vocab})"
        );
        // CTranslate2's vocabulary (.txt, or .json since 3.x) lists every id, timestamps included.
        let listed: Option<Vec<String>> = match std::fs::read_to_string(src.join("vocabulary.txt"))
        {
            Ok(text) => Some(text.lines().map(str::to_string).collect()),
            Err(_) => match std::fs::read_to_string(src.join("vocabulary.json")) {
                Ok(text) => Some(serde_json::from_str(&text).context("parsing vocabulary.json")?),
                Err(_) => None,
            },
        };
        if let Some(listed) = listed {
            ensure!(
                listed.len() == vocab,
                "the vocabulary file has {} tokens, the embeddings {vocab}",
                listed.len()
            );
            for id in [eot, sot, transcribe, translate, sot_prev, no_timestamps] {
                let (file, json) = (&listed[id as usize], &tokens.by_id[&id]);
                ensure!(
                    file == json,
                    "token {id}: the vocabulary file says {file:?}, tokenizer.json {json:?}"
                );
            }
        }
        let lang_ids = match ids(&ct2_config["lang_ids"]) {
            Some(langs) if !langs.is_empty() => langs,
            _ => tokens
                .special
                .iter()
                .map(|(id, _)| *id)
                .filter(|id| *id > sot && *id < translate)
                .collect(),
        };
        let mut lang_to_id = Map::new();
        for id in &lang_ids {
            let token = tokens
                .by_id
                .get(id)
                .with_context(|| format!("language id {id} is not in tokenizer.json"))?;
            ensure!(
                token.starts_with("<|") && token.ends_with("|>"),
                "language id {id} is {token:?}"
            );
            lang_to_id.insert(token.clone(), json!(id));
        }
        let space = tokens.by_content.get("\u{120}").copied().unwrap_or(220);
        let (layers, heads) = (config.decoder_layers, config.decoder_attention_heads);
        let alignment_heads = match ct2_config.get("alignment_heads") {
            Some(heads) if heads.is_array() => heads.clone(),
            // CTranslate2's default: every head of the second half of the decoder layers.
            _ => json!((layers / 2..layers)
                .flat_map(|l| (0..heads).map(move |h| [l, h]))
                .collect::<Vec<_>>()),
        };
        Ok(Specials {
            suppress: ids(&ct2_config["suppress_ids"]).unwrap_or_default(),
            begin_suppress: ids(&ct2_config["suppress_ids_begin"])
                .unwrap_or_else(|| vec![space, eot]),
            tokenizer_text,
            tokenizer,
            tokens,
            eot,
            sot,
            sot_prev,
            no_timestamps,
            transcribe,
            translate,
            lang_to_id,
            alignment_heads,
        })
    }

    /// Sets `config`'s token ids and suppression lists.
    pub(super) fn apply(&self, config: &mut WhisperConfig) {
        (
            config.eos_token_id,
            config.pad_token_id,
            config.bos_token_id,
        ) = (self.eot, self.eot, self.eot);
        config.decoder_start_token_id = self.sot;
        config.suppress_tokens = Some(self.suppress.clone());
        config.begin_suppress_tokens = Some(self.begin_suppress.clone());
    }

    /// Writes config.json, generation_config.json, the tokenizer files and
    /// preprocessor_config.json into `dir`.
    pub(super) fn write(
        &self,
        dir: &Path,
        config: &WhisperConfig,
        tied: bool,
        dtype: &str,
    ) -> Result<()> {
        let mut hf_config = serde_json::to_value(config)?;
        let extra = json!({
            "model_type": "whisper",
            "architectures": ["WhisperForConditionalGeneration"],
            "is_encoder_decoder": true,
            "num_hidden_layers": config.encoder_layers,
            "tie_word_embeddings": tied,
            "use_cache": true,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
            "encoder_layerdrop": 0.0,
            "decoder_layerdrop": 0.0,
            "init_std": 0.02,
            "apply_spec_augment": false,
            "use_weighted_layer_sum": false,
            "classifier_proj_size": 256,
            "median_filter_width": 7,
            "dtype": dtype,
        });
        hf_config
            .as_object_mut()
            .context("config")?
            .extend(extra.as_object().cloned().unwrap_or_default());
        write_json(&dir.join("config.json"), &hf_config)?;

        let mut generation = json!({
            "alignment_heads": self.alignment_heads,
            "begin_suppress_tokens": self.begin_suppress,
            "bos_token_id": self.eot,
            "decoder_start_token_id": self.sot,
            "eos_token_id": self.eot,
            "pad_token_id": self.eot,
            "is_multilingual": !self.lang_to_id.is_empty(),
            "max_initial_timestamp_index": 50,
            "max_length": config.max_target_positions,
            "no_timestamps_token_id": self.no_timestamps,
            "prev_sot_token_id": self.sot_prev,
            "return_timestamps": false,
            "suppress_tokens": self.suppress,
        });
        if !self.lang_to_id.is_empty() {
            generation["lang_to_id"] = Value::Object(self.lang_to_id.clone());
            generation["task_to_id"] =
                json!({"transcribe": self.transcribe, "translate": self.translate});
            // As openai/whisper-*: a bare `generate()` detects the language and transcribes
            // (transformers ignores this when `language` or `task` is given).
            generation["forced_decoder_ids"] = json!([[1, null], [2, self.transcribe]]);
        }
        write_json(&dir.join("generation_config.json"), &generation)?;

        write_tokenizer_files(
            dir,
            &self.tokenizer_text,
            &self.tokenizer,
            &self.tokens,
            self.eot,
        )?;
        write_json(
            &dir.join("preprocessor_config.json"),
            &json!({
                "chunk_length": 30,
                "feature_extractor_type": "WhisperFeatureExtractor",
                "feature_size": config.num_mel_bins,
                "hop_length": 160,
                "n_fft": 400,
                "n_samples": 480000,
                "nb_max_frames": 3000,
                "padding_side": "right",
                "padding_value": 0.0,
                "processor_class": "WhisperProcessor",
                "return_attention_mask": false,
                "sampling_rate": 16000,
            }),
        )
    }
}

/// Special tokens of tokenizer.json (added tokens and BPE vocabulary).
pub(super) struct Tokens {
    by_content: HashMap<String, i64>,
    by_id: BTreeMap<i64, String>,
    /// (id, content) of the added tokens marked special, by id.
    special: Vec<(i64, String)>,
}

impl Tokens {
    fn read(json: &Value) -> Result<Self> {
        let mut tokens = Tokens {
            by_content: HashMap::new(),
            by_id: BTreeMap::new(),
            special: Vec::new(),
        };
        if let Some(vocab) = json["model"]["vocab"].as_object() {
            for (content, id) in vocab {
                tokens.insert(content, id.as_i64().context("tokenizer.json: vocab id")?);
            }
        }
        for added in json["added_tokens"]
            .as_array()
            .context("tokenizer.json has no added_tokens")?
        {
            let (content, id) = (
                added["content"].as_str().context("added token content")?,
                added["id"].as_i64().context("added token id")?,
            );
            tokens.insert(content, id);
            if added["special"].as_bool().unwrap_or(false) {
                tokens.special.push((id, content.to_string()));
            }
        }
        tokens.special.sort();
        Ok(tokens)
    }

    fn insert(&mut self, content: &str, id: i64) {
        self.by_content.insert(content.to_string(), id);
        self.by_id.insert(id, content.to_string());
    }

    fn id(&self, content: &str) -> Result<i64> {
        self.by_content
            .get(content)
            .copied()
            .with_context(|| format!("tokenizer.json has no {content}"))
    }
}

pub(super) fn ids(value: &Value) -> Option<Vec<i64>> {
    value.as_array()?.iter().map(Value::as_i64).collect()
}

pub(super) fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Removes the staging directory unless it was moved into place.
pub(super) struct Staging(pub(super) PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn sibling(dst: &Path, tag: &str) -> Result<PathBuf> {
    let name = dst
        .file_name()
        .with_context(|| format!("{} has no file name", dst.display()))?;
    Ok(dst.with_file_name(format!(
        ".{}.{tag}-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Whether `dst` may be (re)placed: absent, an empty directory, or `overwrite`.
pub(super) fn check_destination(dst: &Path, overwrite: bool) -> Result<()> {
    if dst.exists() && !overwrite {
        let empty = dst.is_dir() && std::fs::read_dir(dst)?.next().is_none();
        ensure!(
            empty,
            "{} exists and is not empty (replace it with --force)",
            dst.display()
        );
    }
    Ok(())
}

/// tokenizer.json as it came, plus what HF's WhisperTokenizer (fast and slow) reads beside it.
fn write_tokenizer_files(
    dir: &Path,
    text: &str,
    json: &Value,
    tokens: &Tokens,
    eot: i64,
) -> Result<()> {
    std::fs::write(dir.join("tokenizer.json"), text).context("writing tokenizer.json")?;
    let eot_token = &tokens.by_id[&eot];
    let additional: Vec<&String> = tokens
        .special
        .iter()
        .filter(|(id, _)| *id > eot)
        .map(|(_, t)| t)
        .collect();
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "WhisperTokenizer",
            "processor_class": "WhisperProcessor",
            "add_prefix_space": false,
            "additional_special_tokens": additional,
            "bos_token": eot_token,
            "eos_token": eot_token,
            "pad_token": eot_token,
            "unk_token": eot_token,
            // transformers 5 ignores (and warns about) true for BPE; 4.x would strip spaces
            // before punctuation.
            "clean_up_tokenization_spaces": false,
            "errors": "replace",
            "model_max_length": 1024,
            "return_attention_mask": false,
        }),
    )?;
    write_json(
        &dir.join("special_tokens_map.json"),
        &json!({"additional_special_tokens": additional, "bos_token": eot_token, "eos_token": eot_token, "pad_token": eot_token, "unk_token": eot_token}),
    )?;
    let vocab = json["model"]["vocab"]
        .as_object()
        .context("tokenizer.json has no BPE vocab")?;
    write_json(&dir.join("vocab.json"), &Value::Object(vocab.clone()))?;
    let added: Map<String, Value> = tokens
        .special
        .iter()
        .filter(|(_, t)| !vocab.contains_key(t))
        .map(|(id, t)| (t.clone(), json!(id)))
        .collect();
    write_json(&dir.join("added_tokens.json"), &Value::Object(added))?;
    let mut merges = String::from("#version: 0.2\n");
    for merge in json["model"]["merges"]
        .as_array()
        .context("tokenizer.json has no BPE merges")?
    {
        match merge {
            Value::String(pair) => merges.push_str(pair),
            Value::Array(pair) => merges.push_str(
                &pair
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            _ => bail!("tokenizer.json: a merge is neither a string nor a pair"),
        }
        merges.push('\n');
    }
    std::fs::write(dir.join("merges.txt"), merges).context("writing merges.txt")
}

/// Moves the finished staging directory to `dst` (replacing an empty one, or any with
/// `overwrite`).
pub(super) fn install(staged: &Path, dst: &Path, overwrite: bool) -> Result<()> {
    check_destination(dst, overwrite)?;
    if dst.exists() {
        let old = sibling(dst, "old")?;
        std::fs::rename(dst, &old).with_context(|| format!("moving {} aside", dst.display()))?;
        std::fs::rename(staged, dst).with_context(|| format!("renaming into {}", dst.display()))?;
        let removed = if old.is_dir() {
            std::fs::remove_dir_all(&old)
        } else {
            std::fs::remove_file(&old)
        };
        removed.with_context(|| format!("removing {}", old.display()))?;
    } else {
        std::fs::rename(staged, dst).with_context(|| format!("renaming into {}", dst.display()))?;
    }
    Ok(())
}
