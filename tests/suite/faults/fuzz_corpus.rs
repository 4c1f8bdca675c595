//! The fuzz targets' committed corpora (`fuzz/corpus/TARGET/`), replayed through the same entry
//! points libFuzzer drives, each input also mutated a few hundred ways: a short fuzz run on every
//! test run. The long runs are by hand (`just fuzz TARGET SECONDS`).

use crate::common;

/// A few hundred deterministic mutations of `input`: bit flips, truncations, splices of
/// interesting integers, duplicated spans.
fn mutations(input: &[u8], count: usize) -> Vec<Vec<u8>> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ input.len() as u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    const INTERESTING: [u64; 6] = [0, 1, 0x7fff_ffff, 0xffff_ffff, 1 << 40, u64::MAX];
    (0..count)
        .map(|_| {
            let mut m = input.to_vec();
            if m.is_empty() {
                return vec![next() as u8];
            }
            let at = next() as usize % m.len();
            match next() % 4 {
                0 => m[at] ^= 1 << (next() % 8),
                1 => m.truncate(at),
                2 => {
                    let v = INTERESTING[next() as usize % INTERESTING.len()].to_le_bytes();
                    let end = (at + 8).min(m.len());
                    m[at..end].copy_from_slice(&v[..end - at]);
                }
                _ => {
                    let end = (at + 1 + next() as usize % 64).min(m.len());
                    let span = m[at..end].to_vec();
                    m.splice(at..at, span);
                }
            }
            m
        })
        .collect()
}

#[test]
fn every_fuzz_target_survives_its_corpus_and_mutations() {
    // Mutations a target, spread over its corpus: the corpora grow with each long run.
    let budget = if common::in_ci() { 10_000 } else { 30_000 };
    for (name, target) in loraforge::diagnostics::fuzz::TARGETS {
        let dir = common::root().join("fuzz/corpus").join(name);
        let inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        assert!(!inputs.is_empty(), "{} is empty", dir.display());
        let per_input = (budget / inputs.len()).max(1);
        let started = std::time::Instant::now();
        let mut runs = 0;
        for input in &inputs {
            target(input);
            for mutated in mutations(input, per_input) {
                target(&mutated);
                runs += 1;
            }
        }
        println!(
            "{name}: {} corpus inputs, {runs} mutations, {:.1} s",
            inputs.len(),
            started.elapsed().as_secs_f64()
        );
    }
}
