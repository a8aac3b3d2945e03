//! exp(z) for the CPU kernels (`cpu_silu`, `cpu_attention`): Cephes' `expf` polynomial, ~1 ulp,
//! written so that the compiler vectorises the loops it is inlined into (libm's `expf` is a
//! scalar call per value). Callers compile those loops for AVX2 where the CPU has it.

#[inline(always)]
pub(crate) fn exp(z: f32) -> f32 {
    // Cephes expf: z = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-7 polynomial, 2^n from
    // the exponent bits. z is clamped to where 2^n is a normal float (so exp(-100) gives
    // exp(-87) ~ 1.6e-38: nothing next to the 1 of a softmax's largest term or of 1 + exp).
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12582912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    let z = z.clamp(-87.0, 88.0);
    let shifted = z * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = z - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 5.000_000_1e-1;
    let e = p * (r * r) + r + 1.0;
    // n as an integer from `shifted`'s low mantissa bits (`as i32` would not vectorise).
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    e * f32::from_bits(n_int.wrapping_add(127) << 23)
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_within_two_ulp_of_the_standard_library() {
        // 2 * 10^6 evenly spaced points over the clamped range.
        let worst = (0..=2_000_000)
            .map(|i| -87.0 + 167.0 * i as f64 / 2e6)
            .map(|z| {
                let got = super::exp(z as f32) as f64;
                let want = (z as f32 as f64).exp();
                ((got - want) / want).abs()
            })
            .fold(0.0f64, f64::max);
        assert!(worst < 2.0 * f32::EPSILON as f64, "largest relative error {worst:e}");
    }

}
