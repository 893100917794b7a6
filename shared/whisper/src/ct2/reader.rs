//! CTranslate2's `model.bin`, as `python/ctranslate2/specs/model_spec.py` (`_serialize`) writes
//! it and `src/models/model.cc` reads it. All integers little-endian:
//!
//! ```text
//! u32 binary_version                      (6 today; 1..=6 are read)
//! str spec name, u32 spec revision        (version >= 2; e.g. "WhisperSpec", 3)
//! u32 n; n x variable:
//!     str name, u8 rank, rank x u32 dims,
//!     u8 dtype id, u32 byte count         (version >= 4; ids: f32 i8 i16 i32 f16 bf16)
//!     | u8 item size, u32 element count   (version < 4; 4 = f32, 2 = i16, 1 = i8)
//!     bytes
//! u32 m; m x (str alias, str variable)    (version >= 3)
//! str = u16 length including a trailing NUL, then the bytes and the NUL
//! ```
//!
//! Variables are sorted by name. Scalars (rank 0) carry settings such as `encoder/num_heads`.
//! A quantised weight `X` (int8, or int16) comes with `X_scale` (int8: one f32 per output row,
//! CTranslate2 stores `round(w * scale)` with `scale = 127 / max|row|`; int16: one scalar), and
//! an alias `A -> X` also makes `A_scale` mean `X_scale`, as the C++ loader registers it.

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

/// The newest binary version this reader knows (`CURRENT_BINARY_VERSION` in model_spec.py).
pub const MAX_BINARY_VERSION: u32 = 6;

/// `DataType` of `include/ctranslate2/types.h`, in id order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ct2DType {
    F32,
    I8,
    I16,
    I32,
    F16,
    BF16,
}

impl Ct2DType {
    pub fn from_id(id: u8) -> Result<Self> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::I8,
            2 => Self::I16,
            3 => Self::I32,
            4 => Self::F16,
            5 => Self::BF16,
            _ => bail!("unknown CTranslate2 dtype id {id}"),
        })
    }

    /// Binary versions before 4 stored the item size only (model.cc `get_dtype_from_item_size`).
    fn from_item_size(size: u8) -> Result<Self> {
        Ok(match size {
            4 => Self::F32,
            2 => Self::I16,
            1 => Self::I8,
            _ => bail!("unknown CTranslate2 item size {size}"),
        })
    }

    pub fn size(self) -> usize {
        match self {
            Self::I8 => 1,
            Self::I16 | Self::F16 | Self::BF16 => 2,
            Self::F32 | Self::I32 => 4,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    /// CTranslate2's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::I8 => "int8",
            Self::I16 => "int16",
            Self::I32 => "int32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }
}

/// One stored variable: shape, dtype and the raw little-endian bytes.
#[derive(Debug, Clone)]
pub struct Variable {
    pub shape: Vec<usize>,
    pub dtype: Ct2DType,
    pub data: Vec<u8>,
}

impl Variable {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_scalar(&self) -> bool {
        self.shape.is_empty()
    }

    /// Elements per slice along dim 0 (a row of a Linear weight, an output channel of a conv).
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Element `i` as f32 (exact for every type but i32 beyond 2^24).
    pub fn value(&self, i: usize) -> f32 {
        let b = &self.data[i * self.dtype.size()..(i + 1) * self.dtype.size()];
        match self.dtype {
            Ct2DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Ct2DType::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
            Ct2DType::I8 => b[0] as i8 as f32,
            Ct2DType::I16 => i16::from_le_bytes([b[0], b[1]]) as f32,
            Ct2DType::F16 => f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
            Ct2DType::BF16 => bf16_to_f32(u16::from_le_bytes([b[0], b[1]])),
        }
    }

    /// An integer scalar (`num_heads`, `activation`, flags).
    pub fn scalar_i64(&self) -> Option<i64> {
        (self.is_scalar() && !self.dtype.is_float()).then(|| self.value(0) as i64)
    }
}

/// The variables of a `model.bin`, by name, with the aliases it declares.
#[derive(Debug, Clone, Default)]
pub struct Ct2Model {
    pub binary_version: u32,
    /// e.g. "WhisperSpec" (empty for binary version 1).
    pub spec: String,
    pub revision: u32,
    pub variables: BTreeMap<String, Variable>,
    /// alias -> stored variable.
    pub aliases: BTreeMap<String, String>,
}

impl Ct2Model {
    /// The stored name behind `name`: itself, an alias's target, or for `A_scale` / `A_zero`
    /// the scale of the alias target (as model.cc registers them).
    pub fn resolve(&self, name: &str) -> Option<String> {
        let mut name = name.to_string();
        for _ in 0..8 {
            if self.variables.contains_key(&name) {
                return Some(name);
            }
            if let Some(target) = self.aliases.get(&name) {
                name = target.clone();
                continue;
            }
            let suffixed = ["_scale", "_zero"].iter().find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                Some(format!("{}{suffix}", self.aliases.get(base)?))
            });
            name = suffixed?;
        }
        None
    }

    /// The variable `name`, aliases resolved.
    pub fn get(&self, name: &str) -> Option<&Variable> {
        self.variables.get(&self.resolve(name)?)
    }

    pub fn require(&self, name: &str) -> Result<&Variable> {
        self.get(name)
            .with_context(|| format!("model.bin has no variable {name}"))
    }

    /// Whether `name` is declared as an alias (e.g. `decoder/projection/weight` of a model whose
    /// output projection is its embedding matrix).
    pub fn is_alias(&self, name: &str) -> bool {
        !self.variables.contains_key(name) && self.aliases.contains_key(name)
    }

    /// An integer scalar setting such as `encoder/num_heads`.
    pub fn scalar(&self, name: &str) -> Option<i64> {
        self.get(name)?.scalar_i64()
    }

    /// Checks that rows `rows` of `name` can be turned into floats: a float variable, or an
    /// int8 / int16 one with a scale of the right size.
    pub fn check_float(&self, name: &str, rows: &Range<usize>) -> Result<()> {
        let var = self.require(name)?;
        ensure!(!var.is_scalar(), "{name} is a scalar");
        ensure!(
            rows.end <= var.shape[0],
            "{name}: rows {rows:?} out of {}",
            var.shape[0]
        );
        match var.dtype {
            t if t.is_float() => {}
            Ct2DType::I8 | Ct2DType::I16 => {
                let scale = self.get(&format!("{name}_scale")).with_context(|| {
                    format!("{name} is {} without {name}_scale", var.dtype.name())
                })?;
                ensure!(
                    scale.dtype.is_float(),
                    "{name}_scale is {}",
                    scale.dtype.name()
                );
                ensure!(
                    self.get(&format!("{name}_zero")).is_none(),
                    "{name}: zero points (AWQ) are not supported"
                );
                let want = if var.dtype == Ct2DType::I8 {
                    var.shape[0]
                } else {
                    1
                };
                ensure!(
                    scale.numel() == want,
                    "{name}_scale has {} values, expected {want}",
                    scale.numel()
                );
            }
            t => bail!("{name}: {} weights cannot be converted", t.name()),
        }
        Ok(())
    }

    /// Rows `rows` (along dim 0) of `name` as f32, dequantised as CTranslate2 does
    /// (`q * (1 / scale)`, per row for int8, one scale for int16). Call [`Self::check_float`]
    /// first; this panics on what it rejects.
    pub fn rows_f32(&self, name: &str, rows: Range<usize>) -> Vec<f32> {
        let var = self.get(name).expect("checked variable");
        let row = var.row_len();
        let scale = match var.dtype {
            Ct2DType::I8 | Ct2DType::I16 => self.get(&format!("{name}_scale")),
            _ => None,
        };
        let mut out = Vec::with_capacity(rows.len() * row);
        for r in rows {
            let factor = scale.map(|s| 1.0 / s.value(if s.numel() == 1 { 0 } else { r }));
            for i in r * row..(r + 1) * row {
                let v = var.value(i);
                out.push(factor.map_or(v, |f| v * f));
            }
        }
        out
    }
}

/// Reads `path` (a `model.bin`).
pub fn read_model_bin(path: &Path) -> Result<Ct2Model> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    parse_model_bin(BufReader::with_capacity(1 << 20, file))
        .with_context(|| format!("reading {}", path.display()))
}

/// Parses a `model.bin` from a stream.
pub fn parse_model_bin(mut r: impl Read) -> Result<Ct2Model> {
    let binary_version = read_u32(&mut r)?;
    ensure!(
        (1..=MAX_BINARY_VERSION).contains(&binary_version),
        "binary version {binary_version} (this reader knows 1..={MAX_BINARY_VERSION}): not a CTranslate2 model.bin, or a newer one"
    );
    let (spec, revision) = if binary_version >= 2 {
        (read_string(&mut r)?, read_u32(&mut r)?)
    } else {
        (String::new(), 1)
    };
    let mut model = Ct2Model {
        binary_version,
        spec,
        revision,
        ..Default::default()
    };
    let count = read_u32(&mut r)?;
    for _ in 0..count {
        let name = read_string(&mut r)?;
        let rank = read_u8(&mut r)? as usize;
        let shape = (0..rank)
            .map(|_| read_u32(&mut r).map(|d| d as usize))
            .collect::<Result<Vec<_>>>()?;
        let (dtype, bytes) = if binary_version >= 4 {
            (
                Ct2DType::from_id(read_u8(&mut r)?)?,
                read_u32(&mut r)? as usize,
            )
        } else {
            let size = read_u8(&mut r)?;
            (
                Ct2DType::from_item_size(size)?,
                read_u32(&mut r)? as usize * size as usize,
            )
        };
        let numel: usize = shape.iter().product();
        ensure!(
            bytes == numel * dtype.size(),
            "variable {name} {shape:?} {}: {bytes} bytes",
            dtype.name()
        );
        let mut data = vec![0u8; bytes];
        r.read_exact(&mut data)
            .with_context(|| format!("data of {name}"))?;
        model
            .variables
            .insert(name, Variable { shape, dtype, data });
    }
    if binary_version >= 3 {
        let count = read_u32(&mut r)?;
        for _ in 0..count {
            let alias = read_string(&mut r)?;
            let target = read_string(&mut r)?;
            model.aliases.insert(alias, target);
        }
    }
    for (alias, target) in &model.aliases {
        ensure!(
            model.resolve(alias).is_some(),
            "alias {alias} -> {target}: no such variable"
        );
    }
    Ok(model)
}

fn read_u8(r: &mut impl Read) -> Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b).context("truncated model.bin")?;
    Ok(b[0])
}

fn read_u32(r: &mut impl Read) -> Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).context("truncated model.bin")?;
    Ok(u32::from_le_bytes(b))
}

fn read_string(r: &mut impl Read) -> Result<String> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b).context("truncated model.bin")?;
    let len = u16::from_le_bytes(b) as usize;
    ensure!(len > 0, "invalid string length 0");
    let mut bytes = vec![0u8; len];
    r.read_exact(&mut bytes).context("truncated model.bin")?;
    bytes.pop();
    String::from_utf8(bytes).context("a name is not UTF-8")
}

/// IEEE half -> single (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: mant * 2^-24; normalise.
            let mut e: i32 = -14;
            let mut m = mant;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (((e + 127) as u32) << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (mant << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (mant << 13),
    };
    f32::from_bits(bits)
}

/// Single -> IEEE half, rounding to nearest even (as torch's `.half()`); overflow gives inf.
pub fn f32_to_f16(f: f32) -> u16 {
    let x = f.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let exp = ((x >> 23) & 0xff) as i32;
    let mant = x & 0x7f_ffff;
    if exp == 0xff {
        return sign
            | 0x7c00
            | if mant != 0 {
                0x200 | (mant >> 13) as u16
            } else {
                0
            };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    let (half, rem, halfway) = if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = mant | 0x80_0000;
        let shift = (14 - e) as u32;
        (m >> shift, m & ((1 << shift) - 1), 1u32 << (shift - 1))
    } else {
        (((e as u32) << 10) | (mant >> 13), mant & 0x1fff, 0x1000)
    };
    let round_up = rem > halfway || (rem == halfway && half & 1 == 1);
    sign | (half + u32::from(round_up)) as u16
}

pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Single -> bfloat16, rounding to nearest even.
pub fn f32_to_bf16(f: f32) -> u16 {
    let x = f.to_bits();
    if f.is_nan() {
        return ((x >> 16) | 0x40) as u16;
    }
    ((x + 0x7fff + ((x >> 16) & 1)) >> 16) as u16
}

/// Writes a `model.bin` as model_spec.py does (binary version 6), for tests.
#[cfg(test)]
pub(crate) fn write_model_bin<S: AsRef<str>>(
    spec: &str,
    revision: u32,
    vars: &[(S, Vec<usize>, Ct2DType, Vec<u8>)],
    aliases: &[(&str, &str)],
) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend(((s.len() + 1) as u16).to_le_bytes());
        out.extend(s.as_bytes());
        out.push(0);
    }
    let mut out = Vec::new();
    out.extend(6u32.to_le_bytes());
    string(&mut out, spec);
    out.extend(revision.to_le_bytes());
    out.extend((vars.len() as u32).to_le_bytes());
    for (name, shape, dtype, data) in vars {
        string(&mut out, name.as_ref());
        out.push(shape.len() as u8);
        shape
            .iter()
            .for_each(|d| out.extend((*d as u32).to_le_bytes()));
        let id = [
            Ct2DType::F32,
            Ct2DType::I8,
            Ct2DType::I16,
            Ct2DType::I32,
            Ct2DType::F16,
            Ct2DType::BF16,
        ]
        .iter()
        .position(|t| t == dtype)
        .unwrap();
        out.push(id as u8);
        out.extend((data.len() as u32).to_le_bytes());
        out.extend(data);
    }
    out.extend((aliases.len() as u32).to_le_bytes());
    for (alias, target) in aliases {
        string(&mut out, alias);
        string(&mut out, target);
    }
    out
}

#[cfg(test)]
pub(crate) fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
pub(crate) fn f16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| f32_to_f16(*v).to_le_bytes())
        .collect()
}

#[cfg(test)]
mod tests;
