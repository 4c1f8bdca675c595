//! `loraforge data report` on a chat dataset: counts, lengths, what the length limit cuts, and a
//! sample whose trained tokens (the assistant turn and its end-of-turn marker) are marked.

use crate::common;

#[test]
fn report_shows_counts_lengths_and_the_mask() {
    let dir = common::temp_dir("data-report");
    let fixture = common::fixture("mlx-lora-parity");
    let recipe = dir.join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            r#"name = "report"
[model]
path = "{model}"
[lora]
rank = 2
[data]
path = "{data}"
mask_prompt = true
max_seq_len = 100
[train]
batch_size = 2
"#,
            model = fixture.join("model").display(),
            data = fixture.join("data").display(),
        ),
    )
    .unwrap();
    let out = common::loraforge(&["data", "report", recipe.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    // The four chats are 77, 125, 104 and 93 tokens long (a byte-level tokenizer): two are over 100.
    let train = stdout.lines().find(|l| l.starts_with("train")).unwrap();
    let cols: Vec<&str> = train.split_whitespace().collect();
    assert_eq!(
        cols[1..8],
        ["4", "399", "93", "125", "125", "125", "2"],
        "{train}"
    );
    assert!(stdout.contains("valid  (none)"), "{stdout}");
    assert!(
        stdout.contains(
            "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n⟦Hammer ready.<|im_end|>\n⟧"
        ),
        "{stdout}"
    );
}
