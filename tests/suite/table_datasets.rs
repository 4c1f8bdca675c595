//! Parquet and CSV splits (written by pyarrow: scripts/fixtures/make_table_datasets.py) read to
//! the same records as the JSON Lines they were made from, and a bad row is named by its number.

use crate::common;

use loraforge::data::load_split;
use loraforge::recipe::FieldNames;

#[test]
fn parquet_chat_rows_equal_their_jsonl() {
    let dir = common::fixture("tables");
    let fields = FieldNames::default();
    let from_parquet = load_split(&dir.join("chat.parquet"), &fields).unwrap();
    let from_jsonl = load_split(&dir.join("chat.jsonl"), &fields).unwrap();
    assert_eq!(from_parquet.len(), 12);
    assert_eq!(from_parquet, from_jsonl);
}

#[test]
fn csv_completion_rows_equal_their_jsonl() {
    let dir = common::fixture("tables");
    let fields = FieldNames::default();
    let from_csv = load_split(&dir.join("completions.csv"), &fields).unwrap();
    let from_jsonl = load_split(&dir.join("completions.jsonl"), &fields).unwrap();
    assert_eq!(from_csv.len(), 4);
    assert_eq!(from_csv, from_jsonl);
}

#[test]
fn a_table_row_without_its_field_is_named() {
    let dir = common::temp_dir("csv-missing");
    let path = dir.join("train.csv");
    std::fs::write(&path, "prompt,completion\nhi,there\nlonely,\n").unwrap();
    let err = format!(
        "{:#}",
        load_split(&path, &FieldNames::default()).unwrap_err()
    );
    assert!(err.contains("train.csv: row 2"), "{err}");
    assert!(err.contains("`completion`"), "{err}");
}

#[test]
fn a_corrupt_parquet_file_is_named() {
    let dir = common::temp_dir("parquet-corrupt");
    let path = dir.join("train.parquet");
    let bytes = std::fs::read(common::fixture("tables/chat.parquet")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!(
        "{:#}",
        load_split(&path, &FieldNames::default()).unwrap_err()
    );
    assert!(err.contains("train.parquet"), "{err}");
}
