//! The run-time CBLAS (`LORAFORGE_BLAS`, `backends/cpu/blas.rs`) against matrixmultiply, with
//! SciPy's OpenBLAS build fetched by `scripts/fetch-assets.sh openblas`.

use crate::common;

use loraforge::backends::cpu::blas::Cblas;

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Row-major, a transposed view, and rows of a wider matrix, for each operand; with and without
/// accumulating onto `c`.
#[test]
fn products_match_matrixmultiply_at_every_layout_cblas_reads() {
    let blas = Cblas::open(&common::asset("openblas")).expect("SciPy's OpenBLAS loads");
    let (m, k, n) = (37, 70, 45);
    // (row stride, column stride) of an r × c operand stored in a buffer of 80 × 80.
    let layouts = |r: usize, c: usize| [(c as isize, 1), (1, r as isize), (80, 1)];
    let (a, b) = (values(80 * 80, 1), values(80 * 80, 2));
    for (rsa, csa) in layouts(m, k) {
        for (rsb, csb) in layouts(k, n) {
            for accumulate in [false, true] {
                let start = values(m * n, 3);
                let (mut ours, mut want) = (start.clone(), start);
                let beta = if accumulate { 1.0 } else { 0.0 };
                // SAFETY: every layout addresses elements inside the 80 × 80 buffers.
                let used = unsafe {
                    matrixmultiply::sgemm(
                        m,
                        k,
                        n,
                        1.0,
                        a.as_ptr(),
                        rsa,
                        csa,
                        b.as_ptr(),
                        rsb,
                        csb,
                        beta,
                        want.as_mut_ptr(),
                        n as isize,
                        1,
                    );
                    blas.gemm(
                        m,
                        k,
                        n,
                        (a.as_ptr(), rsa, csa),
                        (b.as_ptr(), rsb, csb),
                        accumulate,
                        (ours.as_mut_ptr(), n),
                    )
                };
                assert!(used, "CBLAS reads a ({rsa}, {csa}) · b ({rsb}, {csb})");
                let diff = common::max_abs_diff(&ours, &want);
                assert!(
                    diff < 1e-4,
                    "({rsa}, {csa}) · ({rsb}, {csb}), β {beta}: {diff}"
                );
            }
        }
    }
    // No unit stride: left to matrixmultiply, and `c` untouched.
    let mut c = vec![7.0; m * n];
    // SAFETY: strides (2, 3) address elements inside the 80 × 80 buffer.
    let used = unsafe {
        blas.gemm(
            m,
            k,
            n,
            (a.as_ptr(), 2, 3),
            (b.as_ptr(), n as isize, 1),
            false,
            (c.as_mut_ptr(), n),
        )
    };
    assert!(!used);
    assert!(c.iter().all(|&x| x == 7.0));
}

/// Training through the CBLAS follows the built-in GEMM's losses (the sums run in another
/// order, so to rounding, not bit for bit).
#[test]
fn training_through_the_cblas_follows_the_built_in_losses() {
    let library = common::asset("openblas");
    let run = |blas: &str| {
        let args = "bench train --device cpu --shape tiny --steps 3 --warmup-steps 0 \
                    --targets all-linear --rank 8";
        let args: Vec<&str> = args.split_whitespace().collect();
        let out = common::loraforge_with_env(&args, &[("LORAFORGE_BLAS", blas)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout).unwrap();
        let json: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        let losses = |key: &str| json["results"][key].as_f64().unwrap();
        [losses("loss_first"), losses("loss_last")]
    };
    let (ours, builtin) = (run(library.to_str().unwrap()), run(""));
    for (ours, builtin) in ours.iter().zip(&builtin) {
        assert!(
            (ours - builtin).abs() < 1e-4 * builtin.abs(),
            "{ours} vs {builtin}"
        );
    }
}

#[test]
fn a_library_that_does_not_load_is_an_error_naming_the_variable() {
    let out = common::loraforge_with_env(
        &["inspect", "whatever"],
        &[("LORAFORGE_BLAS", "/nonexistent/libopenblas.so")],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("LORAFORGE_BLAS=/nonexistent/libopenblas.so: cannot load it"),
        "{stderr}"
    );
}
