//! Benchmark data: random float buffers, byte-identical weight copies for cache rotation, and
//! sub-weights (chosen rows and groups) for the sampled reference check.

use half::{bf16, f16};
use mlxq::{Buffer, DType, QuantizedWeight};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use std::ops::Range;

/// Elements per independently seeded chunk of a random buffer.
const CHUNK: usize = 1 << 16;

/// A buffer of `dtype` and `shape` filled with uniform values in [-1, 1), reproducibly from
/// `seed` (filled in parallel, chunk by chunk).
pub fn random(dtype: DType, shape: &[usize], seed: u64) -> anyhow::Result<Buffer> {
    fn fill<T: Send>(out: &mut [T], seed: u64, conv: fn(f32) -> T) {
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
            let mut rng =
                StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for v in c {
                *v = conv(rng.gen_range(-1.0f32..1.0));
            }
        });
    }
    let mut b = Buffer::zeros(dtype, shape)?;
    match dtype {
        DType::F32 => fill(b.as_mut_slice::<f32>()?, seed, |v| v),
        DType::F16 => fill(b.as_mut_slice::<f16>()?, seed, f16::from_f32),
        DType::BF16 => fill(b.as_mut_slice::<bf16>()?, seed, bf16::from_f32),
        d => anyhow::bail!("random data of dtype {d}"),
    }
    Ok(b)
}

/// A copy of `b` in fresh memory.
pub fn copy(b: &Buffer) -> anyhow::Result<Buffer> {
    Ok(Buffer::from_bytes(b.bytes(), b.dtype(), b.shape())?)
}

/// `w` and `count − 1` copies of it in fresh memory.
pub fn replicate(w: &QuantizedWeight, count: usize) -> anyhow::Result<Vec<QuantizedWeight>> {
    let mut out = vec![w.clone()];
    for _ in 1..count {
        out.push(QuantizedWeight::new(
            copy(w.packed())?,
            copy(w.scales())?,
            w.biases().map(copy).transpose()?,
            w.spec(),
        )?);
    }
    Ok(out)
}

/// How many copies of `bytes` bytes add up to at least `target` bytes, within `1..=max`.
pub fn copies_for(bytes: usize, target: usize, max: usize) -> usize {
    target.div_ceil(bytes.max(1)).clamp(1, max.max(1))
}

/// `count` indices spread evenly over `0..n`, first and last included (all of them when
/// `count ≥ n`).
pub fn spread(n: usize, count: usize) -> Vec<usize> {
    if count >= n {
        return (0..n).collect();
    }
    if count <= 1 {
        return vec![0];
    }
    let mut v: Vec<usize> = (0..count).map(|i| i * (n - 1) / (count - 1)).collect();
    v.dedup();
    v
}

/// A new 2-D weight holding rows `rows` of the 2-D `w`, and of those only groups `groups`.
pub fn select(
    w: &QuantizedWeight,
    rows: &[usize],
    groups: Range<usize>,
) -> anyhow::Result<QuantizedWeight> {
    anyhow::ensure!(w.batch_shape().is_empty(), "select: a 2-D weight");
    let spec = w.spec();
    let gbytes = spec.group_bytes();
    let row_bytes = w.groups_per_row() * gbytes;
    let ssize = w.scales_dtype().size();
    let per_row_groups = w.groups_per_row();
    let take = |b: &[u8], unit: usize, stride: usize| -> Vec<u8> {
        let mut out = Vec::with_capacity(rows.len() * groups.len() * unit);
        for &r in rows {
            out.extend_from_slice(
                &b[r * stride + groups.start * unit..r * stride + groups.end * unit],
            );
        }
        out
    };
    let ng = groups.len();
    let packed = take(w.packed().bytes(), gbytes, row_bytes);
    let packed = Buffer::from_bytes(&packed, DType::U32, &[rows.len(), ng * gbytes / 4])?;
    let side = |b: &Buffer| -> anyhow::Result<Buffer> {
        let v = take(b.bytes(), ssize, per_row_groups * ssize);
        Ok(Buffer::from_bytes(&v, b.dtype(), &[rows.len(), ng])?)
    };
    let scales = side(w.scales())?;
    let biases = w.biases().map(side).transpose()?;
    Ok(QuantizedWeight::new(packed, scales, biases, spec)?)
}

/// Rounds `v` to `dtype` and back (nearest even), as storing it would.
pub fn round_to(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::F16 => f16::from_f32(v).to_f32(),
        DType::BF16 => bf16::from_f32(v).to_f32(),
        _ => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_covers_both_ends() {
        assert_eq!(spread(10, 3), [0, 4, 9]);
        assert_eq!(spread(3, 8), [0, 1, 2]);
        assert_eq!(spread(5, 1), [0]);
    }

    #[test]
    fn copies_reach_the_target() {
        assert_eq!(copies_for(10, 95, 256), 10);
        assert_eq!(copies_for(1000, 10, 256), 1);
        assert_eq!(copies_for(1, 1000, 256), 256);
    }
}
