//! CTranslate2 (faster-whisper) directories: reading model.bin and converting to HF safetensors.
//! (In progress.)
