//! `loraforge chat`: two turns of SmolLM2 against mlx-lm's greedy answers to the whole
//! conversation rendered by transformers' template (`scripts/fixtures/make_chat_turns.py`), the
//! second turn computing only the tokens past its cache; then the REPL itself under tmux.

use crate::common::{self, tmux, tmux_session, wait_for};

use burn::backend::NdArray;
use loraforge::generate::conversation::Conversation;
use loraforge::generate::{GenerationLimits, SamplingConfig};
use loraforge::model::{KvCache, load_model};

type B = NdArray<f32>;

#[test]
fn two_turns_answer_as_mlx_lm_and_the_second_runs_only_its_new_tokens() {
    let device = Default::default();
    let model = load_model::<B>(&common::asset("smollm2"), &device).unwrap();
    let tokenizer = loraforge::tokenizer::for_model(&model.files).unwrap();
    let reference = common::read_json(&common::fixture("chat-turns/reference.json"));
    let system = reference["system"].as_str().unwrap().to_string();
    let cache = KvCache::new(&model.decoder.config, None);
    let mut chat =
        Conversation::new(&model.decoder, &tokenizer, Some(system), cache, Vec::new()).unwrap();
    let limits = GenerationLimits {
        max_tokens: reference["max_tokens"].as_u64().unwrap() as usize,
        stop_at_eos: true,
        ..Default::default()
    };
    let mut held = 0;
    for (i, want) in reference["turns"].as_array().unwrap().iter().enumerate() {
        let mut streamed = String::new();
        let turn = chat
            .say(
                want["user"].as_str().unwrap(),
                &limits,
                &SamplingConfig::default(),
                &device,
                |piece| streamed.push_str(piece),
            )
            .unwrap();
        assert_eq!(
            turn.prompt_ids,
            common::ids(&want["prompt_ids"]),
            "turn {i}: the prompt"
        );
        assert_eq!(
            turn.generation.ids,
            common::ids(&want["answer_ids"]),
            "turn {i}: the answer"
        );
        assert_eq!(streamed, turn.generation.text);
        assert_eq!(turn.generation.text, want["answer"].as_str().unwrap());
        // Only the tokens past the cache ran: the first turn all of them, the second only what
        // follows the first answer (its end-of-turn marker, the new message).
        let computed = turn.generation.stats.prompt_tokens;
        assert_eq!(
            computed,
            turn.prompt_ids.len() - held,
            "turn {i}: tokens computed"
        );
        if i > 0 {
            assert!(computed < 25, "turn {i}: {computed} tokens computed");
        }
        held = turn.prompt_ids.len() + turn.generation.ids.len();
    }
    let saved = common::temp_dir("chat-save").join("chat.json");
    chat.save(&saved).unwrap();
    let messages = common::read_json(&saved)["messages"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        messages.len(),
        5,
        "system, then two turns of user and assistant"
    );
}

/// Waits until the pane shows `count` occurrences of `needle`; returns the pane.
fn pane_with(session: &str, needle: &str, count: usize) -> String {
    wait_for(120, needle, || {
        let pane = tmux(&["capture-pane", "-p", "-J", "-S", "-200", "-t", session]);
        (pane.matches(needle).count() >= count).then_some(pane)
    })
}

#[test]
fn the_repl_keeps_its_cache_between_turns_under_tmux() {
    let session = format!("loraforge-chat-{}", std::process::id());
    let command = format!(
        "{} chat --model {} --device cpu --max-tokens 12 --system 'Answer briefly.'",
        env!("CARGO_BIN_EXE_loraforge"),
        common::asset("smollm2").display()
    );
    tmux_session(&session, [200, 50], &command);
    let close = || tmux(&["kill-session", "-t", &session]);
    pane_with(&session, ">> ", 1);
    tmux(&[
        "send-keys",
        "-t",
        &session,
        "What is the capital of France?",
        "Enter",
    ]);
    pane_with(&session, "[prompt: ", 1);
    tmux(&["send-keys", "-t", &session, "And of Italy?", "Enter"]);
    let pane = pane_with(&session, "[prompt: ", 2);
    tmux(&["send-keys", "-t", &session, "/quit", "Enter"]);
    close();
    let turns: Vec<(usize, usize)> = pane
        .lines()
        .filter_map(|l| l.split_once("[prompt: ")?.1.split_once(" new tokens of "))
        .map(|(new, rest)| {
            let whole = rest.split_once(',').unwrap().0;
            (new.parse().unwrap(), whole.parse().unwrap())
        })
        .collect();
    assert_eq!(turns.len(), 2, "{pane}");
    assert_eq!(
        turns[0].0, turns[0].1,
        "the first turn computes its whole prompt:\n{pane}"
    );
    assert!(
        turns[1].0 < turns[1].1 / 2,
        "the second turn computes only its new tokens:\n{pane}"
    );
}
