//! Minimal `.npy` (format 1.0) reading and writing of little-endian float32 C-order arrays:
//! what the CLI writes and the differential tests read back from numpy.

use std::io::{self, Read, Write};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Writes `data` as a float32 array of `shape`.
pub fn write_f32<W: Write>(mut w: W, shape: &[usize], data: &[f32]) -> io::Result<()> {
    let expected: usize = shape.iter().product();
    if expected != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "shape {shape:?} holds {expected} values, data has {}",
                data.len()
            ),
        ));
    }
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Pad so that magic + version + length + header + newline is a multiple of 64.
    let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    w.write_all(MAGIC)?;
    w.write_all(&[1, 0])?;
    w.write_all(&(header.len() as u16).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    let mut bytes = Vec::with_capacity(data.len() * 4);
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    w.write_all(&bytes)
}

/// Reads a float32 (`<f4`, C order) array; returns its shape and data.
pub fn read_f32<R: Read>(mut r: R) -> io::Result<(Vec<usize>, Vec<f32>)> {
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
    let mut preamble = [0u8; 8];
    r.read_exact(&mut preamble)?;
    if &preamble[..6] != MAGIC {
        return Err(invalid("not an .npy file".into()));
    }
    let header_len = match preamble[6] {
        1 => {
            let mut len = [0u8; 2];
            r.read_exact(&mut len)?;
            u16::from_le_bytes(len) as usize
        }
        2 | 3 => {
            let mut len = [0u8; 4];
            r.read_exact(&mut len)?;
            u32::from_le_bytes(len) as usize
        }
        v => return Err(invalid(format!("unsupported .npy version {v}"))),
    };
    let mut header = vec![0u8; header_len];
    r.read_exact(&mut header)?;
    let header = String::from_utf8_lossy(&header);
    if !header.contains("'descr': '<f4'") || header.contains("'fortran_order': True") {
        return Err(invalid(format!(
            "expected a C-order float32 array, header {header}"
        )));
    }
    let shape_text = header
        .split("'shape':")
        .nth(1)
        .and_then(|rest| rest.split('(').nth(1))
        .and_then(|rest| rest.split(')').next())
        .ok_or_else(|| invalid(format!("no shape in header {header}")))?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|e| invalid(format!("bad dimension {s:?}: {e}")))
        })
        .collect::<io::Result<Vec<_>>>()?;
    let count: usize = shape.iter().product();
    let mut bytes = vec![0u8; count * 4];
    r.read_exact(&mut bytes)?;
    let data = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((shape, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
        let mut bytes = Vec::new();
        write_f32(&mut bytes, &[2, 3, 4], &data).unwrap();
        assert_eq!((bytes.len() - data.len() * 4) % 64, 0);
        let (shape, back) = read_f32(&bytes[..]).unwrap();
        assert_eq!(shape, vec![2, 3, 4]);
        assert_eq!(back, data);
    }
}
