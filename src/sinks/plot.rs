//! `loraforge plot RUN_DIR`: a run's loss curves (train and validation) and its learning rate,
//! read from `metrics.jsonl` and drawn into `loss.png`, for people who would rather look than
//! read. Drawn by hand on an RGB canvas (lines, ticks, an 8x8 bitmap font) and written with the
//! `png` crate, so plotting adds no graphics stack to the build.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

type Rgb = [u8; 3];

const WHITE: Rgb = [255, 255, 255];
const INK: Rgb = [40, 40, 40];
const GRID: Rgb = [225, 225, 225];
const TRAIN: Rgb = [66, 133, 244];
const VALID: Rgb = [234, 107, 30];
const RATE: Rgb = [52, 168, 83];

/// One line on a panel.
pub struct Series {
    /// The legend label.
    pub name: &'static str,
    /// Line colour, RGB.
    pub color: Rgb,
    /// (x, y) points in data units, drawn in order.
    pub points: Vec<(f64, f64)>,
    /// Mark each point (validation has few).
    pub markers: bool,
}

/// The curves of a run, as `metrics.jsonl` holds them.
pub struct RunCurves {
    /// The run's name from its `started` event, for the title.
    pub name: String,
    /// (step, loss) of each train event.
    pub train: Vec<(f64, f64)>,
    /// (step, validation loss) of each validation event.
    pub valid: Vec<(f64, f64)>,
    /// (step, learning rate) of each train event.
    pub learning_rate: Vec<(f64, f64)>,
}

impl RunCurves {
    /// Reads a `metrics.jsonl`, keeping the latest finite value of each step (a resumed run
    /// appends); errors when it has no train or validation event.
    pub fn read(metrics: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(metrics)
            .with_context(|| format!("reading {} (is this a run folder?)", metrics.display()))?;
        let mut curves = RunCurves {
            name: String::new(),
            train: vec![],
            valid: vec![],
            learning_rate: vec![],
        };
        for (i, line) in text.lines().enumerate() {
            let e: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a JSON event", metrics.display(), i + 1))?;
            let step = e["step"].as_f64().unwrap_or(0.0);
            match e["event"].as_str() {
                Some("started") => curves.name = e["name"].as_str().unwrap_or("").to_string(),
                Some("train") => {
                    curves
                        .train
                        .push((step, e["loss"].as_f64().unwrap_or(f64::NAN)));
                    let lr = e["learning_rate"].as_f64().unwrap_or(f64::NAN);
                    curves.learning_rate.push((step, lr));
                }
                Some("validation") => {
                    curves
                        .valid
                        .push((step, e["loss"].as_f64().unwrap_or(f64::NAN)));
                }
                _ => {}
            }
        }
        if curves.train.is_empty() && curves.valid.is_empty() {
            bail!(
                "{}: no train or validation events to plot",
                metrics.display()
            );
        }
        // A resumed run appends; keep the latest value of each step.
        for points in [
            &mut curves.train,
            &mut curves.valid,
            &mut curves.learning_rate,
        ] {
            points.reverse();
            let mut seen = std::collections::BTreeSet::new();
            points.retain(|(s, v)| v.is_finite() && seen.insert(*s as i64));
            points.reverse();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        Ok(curves)
    }
}

/// Writes `RUN_DIR/loss.png` (or `out`) and returns its path.
pub fn plot(run_dir: &Path, out: Option<&Path>) -> Result<PathBuf> {
    let curves = RunCurves::read(&run_dir.join("metrics.jsonl"))?;
    let out = out.map_or_else(|| run_dir.join("loss.png"), Path::to_path_buf);
    let (w, h) = (1000, 700);
    let mut canvas = Canvas::new(w, h);
    canvas.text(70, 14, &format!("{}: loss", curves.name), INK, 2);
    let loss = [
        Series {
            name: "train",
            color: TRAIN,
            points: curves.train,
            markers: false,
        },
        Series {
            name: "validation",
            color: VALID,
            points: curves.valid,
            markers: true,
        },
    ];
    canvas.panel([90, 50, w - 30, 450], &loss);
    canvas.text(70, 482, "learning rate", INK, 2);
    let rate = [Series {
        name: "learning rate",
        color: RATE,
        points: curves.learning_rate,
        markers: false,
    }];
    canvas.panel([90, 515, w - 30, h - 45], &rate);
    canvas.text(w / 2 - 16, h - 22, "step", INK, 2);
    canvas
        .save_png(&out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<Rgb>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Self {
        Canvas {
            width,
            height,
            pixels: vec![WHITE; width * height],
        }
    }

    fn set(&mut self, x: i64, y: i64, color: Rgb) {
        if (0..self.width as i64).contains(&x) && (0..self.height as i64).contains(&y) {
            self.pixels[y as usize * self.width + x as usize] = color;
        }
    }

    /// A line two pixels wide (Bresenham, doubled vertically).
    fn line(&mut self, from: (i64, i64), to: (i64, i64), color: Rgb, thick: bool) {
        let (mut x, mut y) = from;
        let (dx, dy) = ((to.0 - x).abs(), -(to.1 - y).abs());
        let (sx, sy) = (if x < to.0 { 1 } else { -1 }, if y < to.1 { 1 } else { -1 });
        let mut err = dx + dy;
        loop {
            self.set(x, y, color);
            if thick {
                self.set(x, y + 1, color);
            }
            if (x, y) == to {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// ASCII text with the 8x8 font, scaled by `scale`; other characters become `?`.
    fn text(&mut self, x: usize, y: usize, s: &str, color: Rgb, scale: usize) {
        for (i, c) in s.chars().enumerate() {
            let glyph = font8x8::legacy::BASIC_LEGACY[if c.is_ascii() { c as usize } else { 63 }];
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        for (dy, dx) in (0..scale).flat_map(|a| (0..scale).map(move |b| (a, b))) {
                            let px = x + (i * 8 + col) * scale + dx;
                            self.set(px as i64, (y + row * scale + dy) as i64, color);
                        }
                    }
                }
            }
        }
    }

    /// Axes, grid, tick labels, the series and a legend inside `[left, top, right, bottom]`.
    fn panel(&mut self, [left, top, right, bottom]: [usize; 4], series: &[Series]) {
        let all = || series.iter().flat_map(|s| s.points.iter());
        let (x_lo, x_hi) = bounds(all().map(|p| p.0));
        let (y_lo, y_hi) = bounds(all().map(|p| p.1));
        let to_px = |(x, y): (f64, f64)| {
            let fx = (x - x_lo) / (x_hi - x_lo);
            let fy = (y - y_lo) / (y_hi - y_lo);
            (
                left as i64 + (fx * (right - left) as f64).round() as i64,
                bottom as i64 - (fy * (bottom - top) as f64).round() as i64,
            )
        };
        for tick in ticks(y_lo, y_hi) {
            let (_, py) = to_px((x_lo, tick));
            self.line((left as i64, py), (right as i64, py), GRID, false);
            let label = tick_label(tick, y_hi - y_lo);
            self.text(
                left.saturating_sub(8 * label.len() + 6),
                py as usize - 4,
                &label,
                INK,
                1,
            );
        }
        for tick in ticks(x_lo, x_hi) {
            let (px, _) = to_px((tick, y_lo));
            self.line((px, top as i64), (px, bottom as i64), GRID, false);
            let label = tick_label(tick, x_hi - x_lo);
            self.text(
                (px as usize).saturating_sub(4 * label.len()),
                bottom + 8,
                &label,
                INK,
                1,
            );
        }
        let (l, t, r, b) = (left as i64, top as i64, right as i64, bottom as i64);
        for (from, to) in [((l, b), (r, b)), ((l, t), (l, b))] {
            self.line(from, to, INK, false);
        }
        for s in series {
            let pixels: Vec<(i64, i64)> = s.points.iter().map(|&p| to_px(p)).collect();
            for pair in pixels.windows(2) {
                self.line(pair[0], pair[1], s.color, true);
            }
            if s.markers {
                for &(x, y) in &pixels {
                    for (dx, dy) in (-3..=3).flat_map(|a| (-3..=3).map(move |b| (a, b))) {
                        self.set(x + dx, y + dy, s.color);
                    }
                }
            }
        }
        let x = right.saturating_sub(160);
        for (i, s) in series.iter().enumerate() {
            let y = top + 10 + i * 16;
            self.line(
                (x as i64, y as i64 + 3),
                (x as i64 + 20, y as i64 + 3),
                s.color,
                true,
            );
            self.text(x + 26, y, s.name, INK, 1);
        }
    }

    fn save_png(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut bytes, self.width as u32, self.height as u32);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            let mut writer = encoder.write_header()?;
            writer.write_image_data(self.pixels.as_flattened())?;
        }
        crate::io::atomic::write(path, &bytes)?;
        Ok(())
    }
}

/// The range of `values`, widened when flat, with 5% margins.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) };
    (lo - span * 0.05, hi + span * 0.05)
}

/// About five round ticks (1, 2 or 5 times a power of ten apart) inside `[lo, hi]`.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(magnitude * 10.0);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

fn tick_label(value: f64, span: f64) -> String {
    if value == 0.0 {
        "0".into()
    } else if value.abs() < 1e-2 || value.abs() >= 1e5 {
        format!("{value:.1e}")
    } else if span >= 5.0 {
        format!("{value:.0}")
    } else if span >= 0.5 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        assert_eq!(ticks(0.0, 60.0), [0.0, 20.0, 40.0, 60.0]);
        let t = ticks(1.63, 4.11);
        assert_eq!(t, [2.0, 2.5, 3.0, 3.5, 4.0]);
    }
}
