//! `loraforge bench check --device cpu`: the device checks a GPU machine runs (frozen linears,
//! the attention layer, the attention op's gradients, RoPE's and the element-wise ops' gradients,
//! the trajectory, the decode session against the op-by-op path), run on the
//! CPU backend against their float64 references, so CI keeps the check code itself working
//! between GPU sittings.

use crate::common;

#[test]
fn every_device_check_passes_on_the_cpu() {
    let out = common::loraforge(&["bench", "check", "--device", "cpu"]);
    assert_checks_pass(
        &out,
        &[
            "trajectory",
            "trajectory_chunked_offloaded",
            "linear_dense",
            "linear_q4",
            "linear_q3_g16",
            "linear_q6_g16",
            "decode_session_dense",
            "decode_session_q4",
            "attention",
            "attention_grad",
            "rope_grad",
            "rms_norm_grad",
            "swiglu_grad",
            "cross_entropy_grad",
        ],
    );
}

/// `bench check` exited 0, printed a line for each of `kinds`, and every line passed.
pub fn assert_checks_pass(out: &std::process::Output, kinds: &[&str]) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    for kind in kinds {
        assert!(
            lines.iter().any(|l| l["check"] == *kind),
            "no {kind} check in {lines:?}"
        );
    }
    assert!(lines.iter().all(|l| l["pass"] == true), "{lines:?}");
}
