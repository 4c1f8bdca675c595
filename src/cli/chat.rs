//! `loraforge chat` (mlx_lm.chat): a conversation in the terminal through the model's chat
//! template, its KV cache kept between turns. `/reset`, `/system TEXT`, `/save FILE`, `/quit`
//! (or Ctrl-D); Ctrl-C stops the current answer, not the program.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Args;

use super::generate::{KvArgs, ModelArgs, SamplingArgs};
use crate::backends::{BackendTask, DataParallel, DeviceMemory};
use crate::generate::GenerationLimits;
use crate::generate::conversation::Conversation;
use crate::generate::prompt_cache::{PromptCache, fingerprint};
use crate::model::KvCache;
use crate::ops::ModelBackend;

/// `loraforge chat`'s flags.
#[derive(Args)]
pub struct ChatArgs {
    /// The model, its adapters and the device.
    #[command(flatten)]
    pub target: ModelArgs,
    /// The system message the conversation opens with.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens an answer may have.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// How tokens are picked.
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The KV cache's bound.
    #[command(flatten)]
    kv: KvArgs,
    /// Start from a prompt cache made by `loraforge cache-prompt` with this model: whatever
    /// prefix of the conversation it holds is not computed again.
    #[arg(long, value_name = "FILE")]
    prompt_cache_file: Option<PathBuf>,
}

const HELP: &str = "Type a message and press Enter. /reset forgets the conversation, /system TEXT sets the system message (and resets), /save FILE writes the conversation as JSON, /quit or Ctrl-D leaves; Ctrl-C stops an answer.";

impl BackendTask for ChatArgs {
    type Output = ();

    fn run<B: ModelBackend + DeviceMemory + DataParallel>(self, device: B::Device) -> Result<()> {
        let bound = self.kv.bound()?;
        let model = self.target.load::<B>(&device)?;
        let tokenizer = crate::tokenizer::for_model(&model.files)?;
        let decoder = &model.decoder;
        let (cache, held) = match &self.prompt_cache_file {
            Some(file) => {
                let saved = PromptCache::load(file, decoder, &fingerprint(decoder, &device))?;
                (saved.to_device(&decoder.config, bound, &device), saved.ids)
            }
            None => (KvCache::new(&decoder.config, bound), Vec::new()),
        };
        let mut chat = Conversation::new(decoder, &tokenizer, self.system.clone(), cache, held)?;
        let interrupt = Arc::new(AtomicBool::new(false));
        let answering = Arc::new(AtomicBool::new(false));
        let (flag, busy) = (Arc::clone(&interrupt), Arc::clone(&answering));
        ctrlc::set_handler(move || match busy.load(Ordering::SeqCst) {
            true => flag.store(true, Ordering::SeqCst),
            false => eprint!("\n(/quit or Ctrl-D leaves)\n>> "),
        })
        .context("installing the Ctrl-C handler")?;
        let limits = GenerationLimits {
            max_tokens: self.max_tokens,
            stop_at_eos: true,
            top_logprobs: None,
            interrupt: Some(Arc::clone(&interrupt)),
        };
        let sampling = self.sampling.config();
        println!("[loraforge chat] {HELP}");
        let stdin = std::io::stdin();
        let mut stdout = std::io::stdout();
        let mut line = String::new();
        loop {
            print!(">> ");
            stdout.flush()?;
            line.clear();
            if stdin.lock().read_line(&mut line)? == 0 {
                println!();
                return Ok(());
            }
            let input = line.trim_end_matches(['\n', '\r']);
            let (command, rest) = input.split_once(' ').unwrap_or((input, ""));
            match command {
                "" => continue,
                "/quit" | "/exit" | "/q" => return Ok(()),
                "/help" | "/h" => println!("{HELP}"),
                "/reset" => {
                    chat.reset();
                    println!("[the conversation is reset]");
                }
                "/system" => {
                    let system = (!rest.trim().is_empty()).then(|| rest.trim().to_string());
                    println!(
                        "[system message {}; the conversation is reset]",
                        if system.is_some() { "set" } else { "cleared" }
                    );
                    chat.set_system(system);
                }
                "/save" if !rest.trim().is_empty() => match chat.save(rest.trim().as_ref()) {
                    Ok(()) => println!("[saved the conversation to {}]", rest.trim()),
                    Err(e) => println!("[could not save: {e:#}]"),
                },
                "/save" => println!("[/save needs a file name: /save chat.json]"),
                _ if command.starts_with('/') && !input.contains(' ') => {
                    println!("[unknown command {command}; {HELP}]")
                }
                _ => {
                    interrupt.store(false, Ordering::SeqCst);
                    answering.store(true, Ordering::SeqCst);
                    let turn = chat.say(input, &limits, &sampling, &device, |piece| {
                        let _ = stdout.write_all(piece.as_bytes());
                        let _ = stdout.flush();
                    });
                    answering.store(false, Ordering::SeqCst);
                    let turn = match turn {
                        Ok(turn) => turn,
                        Err(e) => {
                            println!("\n[error: {e:#}]");
                            continue;
                        }
                    };
                    let s = &turn.generation.stats;
                    let stopped = match turn.generation.finish {
                        crate::generate::Finish::Interrupted => " (stopped)",
                        _ => "",
                    };
                    println!(
                        "{stopped}\n[prompt: {} new tokens of {}, {:.1} tokens-per-sec | generation: {} tokens, {:.1} tokens-per-sec]",
                        s.prompt_tokens,
                        turn.prompt_ids.len(),
                        s.prompt_tps,
                        s.generated_tokens,
                        s.generation_tps
                    );
                }
            }
        }
    }
}
