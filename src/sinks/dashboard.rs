//! The live terminal dashboard. It runs on its own thread: the trainer's events arrive over a
//! channel, the screen is redrawn at most ten times a second, and keys become requests on the
//! trainer's [`Controls`]. It never trains and the trainer never waits for it.
//!
//! Keys: `q` stop and save, `s` save now, `e` evaluate now (validation loss and held-out
//! generations, shown in their own panel), `p` pause/resume, `l` linear/log
//! loss scale, `?` help. The terminal is restored on exit, on panic and on Ctrl-C (which, in raw
//! mode, arrives as a key and is treated as `q`).

use std::io::Stdout;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event as Input, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use ratatui::crossterm::{cursor, execute};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style, Stylize};
use ratatui::symbols::Marker;
use ratatui::text::Line;
use ratatui::widgets::{
    Axis, Block, Chart, Clear, Dataset, Gauge, GraphType, Paragraph, Row, Table,
};

use crate::events::Controls;
use crate::events::{Event, GenerationRow, TrainReport};

/// The live dashboard's handle: events go to its thread, which owns the terminal.
pub struct Dashboard {
    events: Sender<Event>,
    thread: JoinHandle<Result<()>>,
}

impl Dashboard {
    /// Takes over the terminal (alternate screen, raw mode) until [`Dashboard::finish`].
    pub fn start(title: String, controls: Arc<Controls>) -> Result<Self> {
        let (events, rx) = channel();
        enter()?;
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            leave();
            default_hook(info);
        }));
        // Named so that its CPU time can be told apart (bench/dashboard_overhead.sh reads it).
        let thread = std::thread::Builder::new()
            .name("dashboard".into())
            .spawn(move || {
                let result = run(title, controls, rx);
                leave();
                result
            })?;
        Ok(Dashboard { events, thread })
    }

    /// Hands an event to the dashboard thread without waiting; once that thread has failed, events
    /// are dropped.
    pub fn send(&self, event: &Event) {
        // The UI thread ends only after `finish`; a send error means it failed, and the trainer
        // must go on regardless.
        let _ = self.events.send(event.clone());
    }

    /// Closes the channel, waits for the last frame and gives the terminal back.
    pub fn finish(self) -> Result<()> {
        drop(self.events);
        self.thread
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the dashboard thread panicked")))
    }
}

fn enter() -> Result<()> {
    enable_raw_mode()?;
    execute!(std::io::stdout(), EnterAlternateScreen, cursor::Hide)?;
    Ok(())
}

fn leave() {
    let _ = disable_raw_mode();
    let _ = execute!(std::io::stdout(), LeaveAlternateScreen, cursor::Show);
}

fn run(title: String, controls: Arc<Controls>, rx: Receiver<Event>) -> Result<()> {
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    let mut view = View::new(title);
    loop {
        let mut finished = false;
        loop {
            match rx.try_recv() {
                Ok(event) => view.update(&event),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    finished = true;
                    break;
                }
            }
        }
        view.paused = controls.paused.load(Ordering::SeqCst);
        draw(&mut terminal, &view)?;
        if finished {
            return Ok(());
        }
        if event::poll(Duration::from_millis(100))?
            && let Input::Key(key) = event::read()?
            && key.kind == KeyEventKind::Press
        {
            let ctrl_c =
                key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
            match key.code {
                _ if ctrl_c => request(&mut view, &controls.stop, "stopping after this step"),
                KeyCode::Char('q') => {
                    request(&mut view, &controls.stop, "stopping after this step")
                }
                KeyCode::Char('s') => {
                    request(&mut view, &controls.save_now, "saving after this step")
                }
                KeyCode::Char('e') => request(
                    &mut view,
                    &controls.evaluate_now,
                    "evaluating after this step (validation and held-out generations)",
                ),
                KeyCode::Char('p') => {
                    let now = !controls.paused.load(Ordering::SeqCst);
                    controls.paused.store(now, Ordering::SeqCst);
                    view.notice = Some(if now { "paused" } else { "resumed" }.into());
                }
                KeyCode::Char('l') => view.log_scale = !view.log_scale,
                KeyCode::Char('?') => view.help = !view.help,
                _ => {}
            }
        }
    }
}

fn request(view: &mut View, flag: &std::sync::atomic::AtomicBool, what: &str) {
    flag.store(true, Ordering::SeqCst);
    view.notice = Some(what.into());
}

/// Everything the screen shows, folded from the events.
struct View {
    title: String,
    started: Instant,
    start_step: usize,
    total_steps: usize,
    train: Vec<(f64, f64)>,
    val: Vec<(f64, f64)>,
    last: Option<TrainReport>,
    best_train: Option<f64>,
    best_val: Option<f64>,
    saved: Option<(usize, PathBuf)>,
    test: Option<(f64, f64)>,
    generations: Option<(usize, Vec<GenerationRow>)>,
    warnings: Vec<String>,
    notice: Option<String>,
    paused: bool,
    log_scale: bool,
    help: bool,
}

impl View {
    fn new(title: String) -> Self {
        View {
            title,
            started: Instant::now(),
            start_step: 0,
            total_steps: 0,
            train: Vec::new(),
            val: Vec::new(),
            last: None,
            best_train: None,
            best_val: None,
            saved: None,
            test: None,
            generations: None,
            warnings: Vec::new(),
            notice: None,
            paused: false,
            log_scale: false,
            help: false,
        }
    }

    fn update(&mut self, event: &Event) {
        let min = |best: Option<f64>, v: f64| Some(best.map_or(v, |b| b.min(v)));
        match event {
            Event::Started {
                name,
                total_steps,
                start_step,
                ..
            } => {
                self.title = name.clone();
                self.total_steps = *total_steps;
                self.start_step = *start_step;
                self.started = Instant::now();
            }
            Event::Train(r) => {
                self.train.push((r.step as f64, r.loss));
                self.best_train = min(self.best_train, r.loss);
                self.last = Some(r.clone());
            }
            Event::Validation { step, loss, .. } => {
                self.val.push((*step as f64, *loss));
                self.best_val = min(self.best_val, *loss);
            }
            Event::Saved { step, dir } => {
                self.saved = Some((*step, dir.clone()));
                self.notice = None;
            }
            Event::Warning { message } => self.warnings.push(message.clone()),
            Event::Test {
                loss, perplexity, ..
            } => self.test = Some((*loss, *perplexity)),
            Event::Generations { step, rows } => {
                self.generations = Some((*step, rows.clone()));
                self.notice = None;
            }
        }
    }

    /// Loss points on the chart's scale (natural log when `l` switched it).
    fn scaled(&self, points: &[(f64, f64)]) -> Vec<(f64, f64)> {
        points
            .iter()
            .map(|&(x, y)| (x, if self.log_scale { y.max(1e-9).ln() } else { y }))
            .collect()
    }

    fn step(&self) -> usize {
        self.last.as_ref().map_or(self.start_step, |r| r.step)
    }

    fn progress_label(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let done = self.step().saturating_sub(self.start_step);
        let left = self.total_steps.saturating_sub(self.step());
        let eta = if done > 0 {
            clock(elapsed / done as f64 * left as f64)
        } else {
            "--:--".into()
        };
        let state = if self.paused { "  PAUSED" } else { "" };
        format!(
            "step {}/{}  elapsed {}  ETA {eta}{state}",
            self.step(),
            self.total_steps,
            clock(elapsed)
        )
    }
}

fn clock(seconds: f64) -> String {
    let s = seconds as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

fn draw(terminal: &mut Terminal<CrosstermBackend<Stdout>>, view: &View) -> Result<()> {
    terminal.draw(|frame| {
        // The generations panel appears once there are generations: one line per prompt.
        let generation_rows = view.generations.as_ref().map_or(0, |(_, rows)| rows.len());
        let generations_height = if generation_rows == 0 {
            0
        } else {
            (generation_rows as u16 + 3).min(8)
        };
        let [top, middle, generations, bottom] = Layout::vertical([
            Constraint::Length(3),
            Constraint::Min(8),
            Constraint::Length(generations_height),
            Constraint::Length(5),
        ])
        .areas(frame.area());
        let ratio = if view.total_steps == 0 {
            0.0
        } else {
            view.step() as f64 / view.total_steps as f64
        };
        frame.render_widget(
            Gauge::default()
                .block(Block::bordered().title(format!(" loraforge · {} ", view.title).bold()))
                .gauge_style(Style::new().fg(Color::Cyan))
                .ratio(ratio.clamp(0.0, 1.0))
                .label(view.progress_label()),
            top,
        );
        let [chart_area, stats_area] =
            Layout::horizontal([Constraint::Percentage(62), Constraint::Percentage(38)])
                .areas(middle);
        let (train, val) = (view.scaled(&view.train), view.scaled(&view.val));
        frame.render_widget(loss_chart(view, &train, &val), chart_area);
        frame.render_widget(stats(view), stats_area);
        if let Some((step, rows)) = &view.generations {
            frame.render_widget(generations_table(*step, rows), generations);
        }
        frame.render_widget(footer(view), bottom);
        if view.help {
            let area = centered(frame.area(), 44, 10);
            frame.render_widget(Clear, area);
            frame.render_widget(
                Paragraph::new(vec![
                    Line::from("q  stop after this step, saving a checkpoint"),
                    Line::from("s  save a checkpoint now"),
                    Line::from("e  validation + held-out generations now"),
                    Line::from("p  pause / resume"),
                    Line::from("l  loss axis: linear / log"),
                    Line::from("?  close this help"),
                ])
                .block(Block::bordered().title(" keys ")),
                area,
            );
        }
    })?;
    Ok(())
}

fn loss_chart<'a>(view: &View, train: &'a [(f64, f64)], val: &'a [(f64, f64)]) -> Chart<'a> {
    let all = train.iter().chain(val);
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, y)| {
        (lo.min(y), hi.max(y))
    });
    let (lo, hi) = if lo.is_finite() {
        (lo, hi.max(lo + 1e-6))
    } else {
        (0.0, 1.0)
    };
    let x_max = view.total_steps.max(1) as f64;
    let label = |v: f64| {
        let v = if view.log_scale { v.exp() } else { v };
        format!("{v:.3}")
    };
    let datasets = vec![
        Dataset::default()
            .name("train")
            .marker(Marker::Braille)
            .graph_type(GraphType::Line)
            .style(Style::new().fg(Color::Cyan))
            .data(train),
        Dataset::default()
            .name("val")
            .marker(Marker::Dot)
            .graph_type(GraphType::Line)
            .style(Style::new().fg(Color::Yellow))
            .data(val),
    ];
    let scale_name = if view.log_scale { "log" } else { "linear" };
    Chart::new(datasets)
        .block(Block::bordered().title(format!(" loss ({scale_name}; l switches) ")))
        .x_axis(
            Axis::default()
                .bounds([0.0, x_max])
                .labels(["0".to_string(), format!("{}", view.total_steps)]),
        )
        .y_axis(
            Axis::default()
                .bounds([lo, hi])
                .labels([label(lo), label(hi)]),
        )
}

fn stats(view: &View) -> Table<'_> {
    let fmt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
    let r = view.last.as_ref();
    let mem = |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.2} GB", b as f64 / 1e9));
    let rows = vec![
        Row::new(["", "now", "best"]).bold(),
        Row::new([
            "train loss".to_string(),
            fmt(r.map(|r| r.loss), 3),
            fmt(view.best_train, 3),
        ]),
        Row::new([
            "val loss".to_string(),
            fmt(view.val.last().map(|v| v.1), 3),
            fmt(view.best_val, 3),
        ]),
        Row::new([
            "learning rate".to_string(),
            r.map_or("-".into(), |r| format!("{:.2e}", r.learning_rate)),
            String::new(),
        ]),
        Row::new([
            "grad norm".to_string(),
            fmt(r.map(|r| r.grad_norm), 3),
            String::new(),
        ]),
        Row::new([
            "it/s".to_string(),
            fmt(r.map(|r| r.it_per_sec), 3),
            String::new(),
        ]),
        Row::new([
            "tokens/s".to_string(),
            fmt(r.map(|r| r.tokens_per_sec), 1),
            String::new(),
        ]),
        Row::new([
            "trained tokens".to_string(),
            r.map_or("-".into(), |r| r.trained_tokens.to_string()),
            String::new(),
        ]),
        Row::new([
            "peak memory".to_string(),
            mem(r.and_then(|r| r.peak_memory_bytes)),
            String::new(),
        ]),
    ];
    Table::new(
        rows,
        [
            Constraint::Length(15),
            Constraint::Length(10),
            Constraint::Length(8),
        ],
    )
    .block(Block::bordered().title(" metrics "))
}

fn generations_table(step: usize, rows: &[GenerationRow]) -> Table<'_> {
    let one_line = |s: &str| s.replace('\n', " ");
    let body = rows
        .iter()
        .map(|r| Row::new([one_line(&r.prompt), one_line(&r.base), one_line(&r.tuned)]));
    Table::new(
        body,
        [
            Constraint::Percentage(30),
            Constraint::Percentage(35),
            Constraint::Percentage(35),
        ],
    )
    .header(Row::new(["prompt", "base", "fine-tuned"]).bold())
    .block(Block::bordered().title(format!(" held-out generations (step {step}) ")))
}

fn footer(view: &View) -> Paragraph<'_> {
    let saved = view
        .saved
        .as_ref()
        .map_or("no checkpoint yet".into(), |(step, dir)| {
            format!("checkpoint: step {step} → {}", dir.display())
        });
    let warning = view.warnings.last().map_or("no warnings".into(), |w| {
        format!("warning ({}): {w}", view.warnings.len())
    });
    let status = match (&view.notice, view.test) {
        (Some(n), _) => n.clone(),
        (None, Some((loss, ppl))) => format!("test loss {loss:.3}, ppl {ppl:.3}"),
        (None, None) => String::new(),
    };
    Paragraph::new(vec![
        Line::from(saved),
        Line::from(warning).fg(Color::Yellow),
        Line::from(format!(
            "q stop · s save · e eval · p pause · l scale · ? help   {status}"
        )),
    ])
    .block(Block::bordered())
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width);
    let h = height.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}
