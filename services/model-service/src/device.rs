//! Choosing the libtorch device.

use tch::Device;

use crate::error::ModelError;

/// Parses `auto`, `cpu` or `cuda:N`; `auto` takes CUDA device 0 when libtorch sees one.
pub fn select(spec: &str) -> Result<Device, ModelError> {
    match spec {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        other => {
            let index = other
                .strip_prefix("cuda:")
                .or_else(|| (other == "cuda").then_some("0"))
                .and_then(|i| i.parse::<usize>().ok())
                .ok_or_else(|| {
                    ModelError::Config(format!(
                        "--device must be auto, cpu or cuda:N, got {other:?}"
                    ))
                })?;
            let available = tch::Cuda::device_count() as usize;
            if index >= available {
                return Err(ModelError::Config(format!(
                    "--device {other}: libtorch sees {available} CUDA device(s)"
                )));
            }
            Ok(Device::Cuda(index))
        }
    }
}

pub fn describe(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        assert_eq!(select("cpu").unwrap(), Device::Cpu);
        assert!(select("tpu").is_err());
        assert!(select("cuda:999").is_err());
        // libtorch is linked and answers (true on a GPU machine, false here).
        let _ = select("auto").unwrap();
    }
}
