//! NVRTC compilation to a cubin for the device's own architecture, with a disk cache.
//!
//! The cache file is named by a 128-bit FNV-1a hash of everything that decides the cubin: the
//! source, the options, the architecture, the driver's and NVRTC's versions. It lives in
//! `$MLXQ_CUDA_CACHE`, else `$XDG_CACHE_HOME/mlxq/cuda`, else `$HOME/.cache/mlxq/cuda`; a
//! cache that cannot be read or written is skipped silently (compiling again is always right).

use crate::error::{Error, Result};
use cudarc::nvrtc::{result as rtc, sys};
use std::ffi::CString;
use std::path::PathBuf;

/// Magic at the head of a cache file, followed by the 16-byte key hash and the cubin.
const MAGIC: &[u8; 8] = b"MLXQCUB1";

/// 128-bit FNV-1a.
fn fnv1a128(data: &[u8]) -> u128 {
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for &b in data {
        h ^= u128::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("MLXQ_CUDA_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("mlxq").join("cuda"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("mlxq").join("cuda"))
}

/// NVRTC's version, or an error saying the library is missing.
pub(crate) fn version() -> Result<(i32, i32)> {
    // SAFETY: probing for the library has no preconditions.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::Cuda {
            op: "nvrtc",
            cause: "libnvrtc was not found (install the CUDA toolkit's NVRTC)".into(),
        });
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Cuda {
            op: "nvrtc",
            cause: format!("nvrtcVersion: {e:?}"),
        })?;
    Ok((major, minor))
}

/// Whether kernels for compute capability `arch` are compiled for `sm_90a`, whose
/// arch-specific instructions (wgmma in `qmm_wg.cu`) the Hopper prefill uses: Hopper (90), with
/// an NVRTC that knows the target (CUDA 12 or later; CUDA 11.8 stays on plain `sm_90`, where
/// the `qmm_wg` entry points are empty stubs the dispatcher never chooses).
pub(crate) fn wgmma(arch: u32) -> bool {
    arch == 90 && version().is_ok_and(|(major, _)| major >= 12)
}

/// NVRTC's target for compute capability `arch`: `sm_90a` where [`wgmma`] holds (such a cubin
/// runs on compute capability 9.0 only, the device it is compiled for), else `sm_{arch}`.
pub(crate) fn target(arch: u32) -> String {
    if wgmma(arch) {
        "sm_90a".to_string()
    } else {
        format!("sm_{arch}")
    }
}

/// Compiles `src` with `options` for `arch` (e.g. 90, see [`target`]), through the disk
/// cache. `driver` is the driver version, part of the cache key. Returns the cubin.
pub(crate) fn compile(
    name: &str,
    src: &str,
    options: &[String],
    arch: u32,
    driver: i32,
) -> Result<Vec<u8>> {
    let nvrtc = version()?;
    let mut opts = vec![format!("--gpu-architecture={}", target(arch))];
    opts.extend(options.iter().cloned());
    let key = format!("{src}\0{opts:?}\0sm_{arch}\0driver {driver}\0nvrtc {nvrtc:?}");
    let hash = fnv1a128(key.as_bytes()).to_le_bytes();
    let path = cache_dir().map(|d| d.join(format!("{}.cubin", hex(&hash))));
    if let Some(p) = &path {
        if let Ok(bytes) = std::fs::read(p) {
            if bytes.len() > 24 && &bytes[..8] == MAGIC && bytes[8..24] == hash {
                return Ok(bytes[24..].to_vec());
            }
        }
    }
    let cubin = compile_uncached(name, src, &opts)?;
    if let Some(p) = &path {
        // Write to a unique temporary name, then rename: readers never see a partial file.
        let _ = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(p.parent().unwrap_or(p))?;
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            let mut data = Vec::with_capacity(24 + cubin.len());
            data.extend_from_slice(MAGIC);
            data.extend_from_slice(&hash);
            data.extend_from_slice(&cubin);
            std::fs::write(&tmp, data)?;
            std::fs::rename(&tmp, p)
        })();
    }
    Ok(cubin)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn compile_uncached(name: &str, src: &str, opts: &[String]) -> Result<Vec<u8>> {
    let err = |what: &str, e: rtc::NvrtcError| Error::Cuda {
        op: "nvrtc",
        cause: format!("{name}: {what}: {e:?}"),
    };
    let csrc = CString::new(src).map_err(|_| Error::Cuda {
        op: "nvrtc",
        cause: format!("{name}: source holds a NUL byte"),
    })?;
    let cname = CString::new(format!("{name}.cu")).unwrap_or_default();
    let prog = rtc::create_program(&csrc, Some(&cname)).map_err(|e| err("create", e))?;
    // SAFETY: `prog` is a live program until destroyed below; options are plain strings.
    let compiled = unsafe { rtc::compile_program(prog, opts) };
    let out = match compiled {
        Err(e) => {
            // SAFETY: as above.
            let log = unsafe { rtc::get_program_log(prog) }
                .map(|l| {
                    let bytes: Vec<u8> =
                        l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                })
                .unwrap_or_default();
            Err(Error::KernelCompile {
                kernel: name.to_string(),
                cause: format!("{e:?}"),
                log,
            })
        }
        Ok(()) => {
            let mut size = 0usize;
            // SAFETY: `prog` compiled; NVRTC writes `size` bytes into a buffer of that size.
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
                .result()
                .map_err(|e| err("cubin size", e))
                .and_then(|()| {
                    let mut cubin = vec![0u8; size];
                    // SAFETY: `cubin` holds `size` bytes.
                    unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) }
                        .result()
                        .map_err(|e| err("cubin", e))?;
                    Ok(cubin)
                })
        }
    };
    // SAFETY: destroyed once, after its last use.
    let _ = unsafe { rtc::destroy_program(prog) };
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn fnv_differs_on_any_change() {
        assert_ne!(super::fnv1a128(b"a"), super::fnv1a128(b"b"));
        assert_eq!(super::fnv1a128(b""), 0x6c62272e07bb014262b821756295c58d);
    }
}
