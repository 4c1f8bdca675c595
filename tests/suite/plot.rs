//! `loraforge plot RUN_DIR` draws a real run's curves: the PNG decodes, and the train (blue),
//! validation (orange) and learning-rate (green) lines are on it. A folder without
//! metrics.jsonl is named in the error.

use crate::common;

fn count(pixels: &[u8], color: [u8; 3]) -> usize {
    pixels.chunks_exact(3).filter(|p| *p == color).count()
}

#[test]
fn plot_draws_the_loss_and_learning_rate_of_a_run() {
    let run = common::tiny_run::tiny_run("plot", "");
    let trained = common::loraforge(&[
        "train",
        run.recipe.to_str().unwrap(),
        "--set",
        "train.iters=12",
    ]);
    assert!(
        trained.status.success(),
        "{}",
        String::from_utf8_lossy(&trained.stderr)
    );
    let run_dir = common::tiny_run::run_dir(&run);
    let out = common::loraforge(&["plot", run_dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png_path = run_dir.join("loss.png");
    assert!(String::from_utf8_lossy(&out.stdout).contains("loss.png"));

    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&png_path).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((info.width, info.height), (1000, 700));
    let (train, valid, rate) = (
        count(&pixels, [66, 133, 244]),
        count(&pixels, [234, 107, 30]),
        count(&pixels, [52, 168, 83]),
    );
    println!("pixels: train {train}, validation {valid}, learning rate {rate}");
    // 12 train points joined by 2-pixel lines across ~880 pixels, 3 validation markers, and
    // a learning-rate line.
    assert!(train > 800, "train line: {train} pixels");
    assert!(valid > 3 * 40, "validation markers: {valid} pixels");
    assert!(rate > 800, "learning-rate line: {rate} pixels");

    let missing = common::loraforge(&["plot", run.dir.join("nowhere").to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(
        stderr.contains("metrics.jsonl") && stderr.contains("run folder"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&run.dir).unwrap();
}
