//! Host f32 values to and from the bytes of device buffers in the storage type: f32 as
//! is, f16 converted (round to nearest even; beyond f16's range, infinities) and padded
//! to a multiple of 4 bytes, since wgpu's buffer sizes, writes and copies must be.

use std::borrow::Cow;

use half::f16;

use crate::codegen::Storage;

/// wgpu's alignment of buffer sizes, writes and copies.
const ALIGN: u64 = wgpu::COPY_BUFFER_ALIGNMENT;

/// The bytes of `numel` elements stored as `st`, rounded up to [`ALIGN`]; `None` on
/// overflow.
pub(crate) fn stored_bytes(st: Storage, numel: u64) -> Option<u64> {
    numel
        .checked_mul(st.bytes() as u64)?
        .checked_next_multiple_of(ALIGN)
}

/// `data` as `st`'s bytes, [`stored_bytes`] long.
pub(crate) fn encode(st: Storage, data: &[f32]) -> Cow<'_, [u8]> {
    match st {
        Storage::F32 => Cow::Borrowed(bytemuck::cast_slice(data)),
        Storage::F16 => {
            let mut out = Vec::with_capacity(data.len() * 2 + 2);
            for &v in data {
                out.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
            }
            out.resize(out.len().next_multiple_of(ALIGN as usize), 0);
            Cow::Owned(out)
        }
    }
}

/// The first `numel` elements of `bytes` (stored as `st`) as f32; `None` when `bytes` is
/// too short.
pub(crate) fn decode(st: Storage, bytes: &[u8], numel: usize) -> Option<Vec<f32>> {
    let bytes = bytes.get(..numel.checked_mul(st.bytes())?)?;
    Some(match st {
        Storage::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(bytes),
        Storage::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_padded_to_four_bytes() {
        assert_eq!(stored_bytes(Storage::F32, 3), Some(12));
        assert_eq!(stored_bytes(Storage::F16, 0), Some(0));
        assert_eq!(stored_bytes(Storage::F16, 1), Some(4));
        assert_eq!(stored_bytes(Storage::F16, 2), Some(4));
        assert_eq!(stored_bytes(Storage::F16, 3), Some(8));
        assert_eq!(stored_bytes(Storage::F16, u64::MAX), None);
        for n in 0..9usize {
            let v: Vec<f32> = (0..n).map(|i| i as f32 - 2.5).collect();
            for st in [Storage::F32, Storage::F16] {
                let e = encode(st, &v);
                assert_eq!(e.len() as u64, stored_bytes(st, n as u64).unwrap());
                assert_eq!(decode(st, &e, n).unwrap(), v, "{st:?} {n}");
            }
        }
        assert!(decode(Storage::F16, &[0; 4], 3).is_none());
    }

    #[test]
    fn f16_rounds_and_keeps_special_values() {
        let v = [
            1.0 + 1.0 / 2048.0, // halfway between 1 and 1 + 2^-10: to even, 1.0
            65504.0,
            1e6,
            -1e6,
            f32::NEG_INFINITY,
            f32::NAN,
            6e-8, // the smallest f16 subnormal is 2^-24 = 5.96e-8
            -0.0,
        ];
        let d = decode(Storage::F16, &encode(Storage::F16, &v), v.len()).unwrap();
        assert_eq!(d[0], 1.0);
        assert_eq!(d[1], 65504.0);
        assert_eq!(d[2], f32::INFINITY);
        assert_eq!(d[3], f32::NEG_INFINITY);
        assert_eq!(d[4], f32::NEG_INFINITY);
        assert!(d[5].is_nan());
        assert_eq!(d[6], 2f32.powi(-24));
        assert!(d[7] == 0.0 && d[7].is_sign_negative());
    }
}
