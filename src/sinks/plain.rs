//! mlx-lm-style progress lines (`Iter 10: Train loss 2.345, ...`): the sink for pipes, CI logs and
//! `--no-tui`.

use crate::events::Event;

/// mlx-lm-style progress lines, for pipes and CI logs.
pub fn plain_line(event: &Event) -> String {
    match event {
        Event::Started {
            name,
            total_steps,
            start_step,
            trainable_parameters,
            train_examples,
        } => format!(
            "Training {name}: {trainable_parameters} trainable parameters, {train_examples} examples, steps {}..{total_steps}",
            start_step + 1
        ),
        Event::Train(r) => format!(
            "Iter {}: Train loss {:.3}{}, Learning Rate {}, Grad norm {:.3}, It/sec {:.3}, Tokens/sec {:.1}, Trained Tokens {}, Peak mem {:.3} GB",
            r.step,
            r.loss,
            router_part(r.router_aux_loss),
            python_sci(r.learning_rate),
            r.grad_norm,
            r.it_per_sec,
            r.tokens_per_sec,
            r.trained_tokens,
            r.peak_memory_bytes.unwrap_or(0) as f64 / 1e9
        ),
        Event::Validation {
            step,
            loss,
            router_aux_loss,
            seconds,
        } => {
            let aux = router_part(*router_aux_loss);
            format!("Iter {step}: Val loss {loss:.3}{aux}, Val took {seconds:.3}s")
        }
        Event::Saved { step, dir } => {
            format!("Iter {step}: Saved adapter weights to {}", dir.display())
        }
        Event::Warning { message } => format!("warning: {message}"),
        Event::Test {
            loss,
            router_aux_loss,
            perplexity,
            ..
        } => {
            let aux = router_part(*router_aux_loss);
            format!("Test loss {loss:.3}{aux}, Test ppl {perplexity:.3}")
        }
        Event::Generations { step, rows } => {
            let mut out = format!(
                "Iter {step}: Generations on {} held-out prompts",
                rows.len()
            );
            for r in rows {
                let one_line = |s: &str| s.replace('\n', " ");
                out += &format!(
                    "\n  prompt: {}\n    base:  {}\n    tuned: {}",
                    one_line(&r.prompt),
                    one_line(&r.base),
                    one_line(&r.tuned)
                );
            }
            out
        }
    }
}

/// The routers' share of a loss, where training adds one: ` (router aux 0.012)`.
fn router_part(aux: Option<f64>) -> String {
    aux.map_or(String::new(), |a| format!(" (router aux {a:.3})"))
}

/// `x` as Python's `f"{x:.3e}"` writes it (`1.000e-05`; Rust writes `1.000e-5`).
fn python_sci(x: f64) -> String {
    let rust = format!("{x:.3e}");
    match rust.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ("-", d),
                None => ("+", exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => rust,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::TrainReport;

    #[test]
    fn train_lines_read_like_mlx_lm() {
        let line = plain_line(&Event::Train(TrainReport {
            step: 10,
            loss: 2.3454,
            router_aux_loss: None,
            learning_rate: 1e-5,
            grad_norm: 0.87,
            it_per_sec: 0.46,
            tokens_per_sec: 478.94,
            trained_tokens: 10402,
            peak_memory_bytes: Some(1_234_000_000),
        }));
        assert_eq!(
            line,
            "Iter 10: Train loss 2.345, Learning Rate 1.000e-05, Grad norm 0.870, It/sec 0.460, \
             Tokens/sec 478.9, Trained Tokens 10402, Peak mem 1.234 GB"
        );
        let val = plain_line(&Event::Validation {
            step: 20,
            loss: 1.5,
            router_aux_loss: None,
            seconds: 2.25,
        });
        assert_eq!(val, "Iter 20: Val loss 1.500, Val took 2.250s");
        let moe = plain_line(&Event::Validation {
            step: 20,
            loss: 1.5,
            router_aux_loss: Some(0.0125),
            seconds: 2.25,
        });
        assert_eq!(
            moe,
            "Iter 20: Val loss 1.500 (router aux 0.013), Val took 2.250s"
        );
        assert_eq!(python_sci(2e-4), "2.000e-04");
        assert_eq!(python_sci(123456.0), "1.235e+05");
    }
}
