//! Sample-quality measures for the 2-D toy distributions: the energy distance between point
//! sets (zero exactly when the distributions agree) and, for Gaussian mixtures, mode coverage.

use dmd_datasets::GaussianMixture;
use serde::Serialize;

fn dist(a: &[f32], b: &[f32]) -> f64 {
    ((a[0] as f64 - b[0] as f64).powi(2) + (a[1] as f64 - b[1] as f64).powi(2)).sqrt()
}

fn mean_pairwise(a: &[f32], b: &[f32], same: bool) -> f64 {
    let (pa, pb): (Vec<&[f32]>, Vec<&[f32]>) = (a.chunks_exact(2).collect(), b.chunks_exact(2).collect());
    let mut total = 0.0;
    let mut count = 0usize;
    for (i, x) in pa.iter().enumerate() {
        for (j, y) in pb.iter().enumerate() {
            if same && i == j {
                continue;
            }
            total += dist(x, y);
            count += 1;
        }
    }
    total / count.max(1) as f64
}

/// Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| between two sets of 2-D points (flat
/// [x0, y0, x1, y1, ...]); the within-set terms leave out the diagonal (unbiased).
pub fn energy_distance(a: &[f32], b: &[f32]) -> f64 {
    2.0 * mean_pairwise(a, b, false) - mean_pairwise(a, a, true) - mean_pairwise(b, b, true)
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModeStats {
    /// Modes holding at least a quarter of their fair share of samples.
    pub modes_covered: usize,
    pub num_modes: usize,
    /// Fraction of samples within 3 standard deviations of their nearest mode.
    pub frac_near_mode: f64,
    /// KL divergence of the nearest-mode histogram from the mixture weights (0: balanced).
    pub mode_kl: f64,
}

pub fn mode_stats(points: &[f32], mixture: &GaussianMixture) -> ModeStats {
    let k = mixture.num_modes();
    let mut counts = vec![0usize; k];
    let mut near = 0usize;
    let n = points.len() / 2;
    for p in points.chunks_exact(2) {
        let (m, d) = mixture.nearest_mode([p[0] as f64, p[1] as f64]);
        counts[m] += 1;
        if d < 3.0 * mixture.std {
            near += 1;
        }
    }
    let covered = counts
        .iter()
        .zip(&mixture.weights)
        .filter(|(&c, &w)| c as f64 >= 0.25 * w * n as f64)
        .count();
    let kl = counts
        .iter()
        .zip(&mixture.weights)
        .filter(|(&c, _)| c > 0)
        .map(|(&c, &w)| {
            let p = c as f64 / n as f64;
            p * (p / w).ln()
        })
        .sum();
    ModeStats { modes_covered: covered, num_modes: k, frac_near_mode: near as f64 / n.max(1) as f64, mode_kl: kl }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn energy_distance_of_a_shift() {
        // Two point masses at distance d: 2d - 0 - 0.
        let a = vec![0.0f32, 0.0, 0.0, 0.0];
        let b = vec![3.0f32, 4.0, 3.0, 4.0];
        assert!((energy_distance(&a, &b) - 10.0).abs() < 1e-9);
        assert!(energy_distance(&a, &a).abs() < 1e-12);
    }

    #[test]
    fn collapsed_samples_cover_one_mode() {
        let m = GaussianMixture::ring(8, 0.7, 0.04);
        let pts: Vec<f32> = (0..100).flat_map(|_| [0.7f32, 0.0]).collect();
        let s = mode_stats(&pts, &m);
        assert_eq!(s.modes_covered, 1);
        assert!((s.mode_kl - 8f64.ln()).abs() < 1e-9);
        assert_eq!(s.frac_near_mode, 1.0);
    }
}
