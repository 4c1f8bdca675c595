//! TensorBoard event files, written directly (tensorboard-rs is unmaintained and pulls an
//! advisory-flagged protobuf). A file is a sequence of TFRecords:
//!
//! ```text
//! u64 len (LE) | u32 masked_crc32c(len bytes) | len bytes of a serialized Event | u32 masked_crc32c(data)
//! ```
//!
//! and the first Event carries `file_version = "brain.Event:2"`. The messages used, with their
//! field numbers from tensorflow/core/util/event.proto and framework/summary.proto:
//!
//! ```text
//! Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//! Summary { repeated Value value = 1; }
//! Value   { string tag = 1; float simple_value = 2; TensorProto tensor = 8; SummaryMetadata metadata = 9; }
//! TensorProto     { DataType dtype = 1 (DT_STRING = 7); TensorShapeProto shape = 2; repeated bytes string_val = 8; }
//! SummaryMetadata { PluginData plugin_data = 1 { string plugin_name = 1; } }
//! ```
//!
//! Scalars use `simple_value`; text uses a scalar string tensor tagged with the `text` plugin.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// One TensorBoard event file, written a flushed record at a time.
pub struct EventFileWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventFileWriter {
    /// Creates `dir/events.out.tfevents.<seconds>.<host>` (the name TensorBoard looks for).
    pub fn create(dir: &Path, wall_time: f64) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}", wall_time as u64));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut writer = EventFileWriter {
            path,
            out: BufWriter::new(file),
        };
        let mut event = Message::default();
        event.double(1, wall_time);
        event.bytes(3, b"brain.Event:2");
        writer.record(&event.0)?;
        Ok(writer)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a scalar summary `tag` = `value` at `step`.
    pub fn scalar(&mut self, tag: &str, step: i64, value: f32, wall_time: f64) -> Result<()> {
        let mut v = Message::default();
        v.bytes(1, tag.as_bytes());
        v.float(2, value);
        self.summary(step, wall_time, &v)
    }

    /// Appends a text summary (Markdown, shown by TensorBoard's text plugin) at `step`.
    pub fn text(&mut self, tag: &str, step: i64, text: &str, wall_time: f64) -> Result<()> {
        let mut tensor = Message::default();
        tensor.varint(1, 7); // DT_STRING
        tensor.bytes(2, &[]); // a scalar: an empty TensorShapeProto
        tensor.bytes(8, text.as_bytes());
        let mut plugin = Message::default();
        plugin.bytes(1, b"text");
        let mut metadata = Message::default();
        metadata.bytes(1, &plugin.0);
        let mut v = Message::default();
        v.bytes(1, tag.as_bytes());
        v.bytes(8, &tensor.0);
        v.bytes(9, &metadata.0);
        self.summary(step, wall_time, &v)
    }

    fn summary(&mut self, step: i64, wall_time: f64, value: &Message) -> Result<()> {
        let mut summary = Message::default();
        summary.bytes(1, &value.0);
        let mut event = Message::default();
        event.double(1, wall_time);
        event.varint(2, step as u64);
        event.bytes(5, &summary.0);
        self.record(&event.0)
    }

    /// One TFRecord, flushed so a reader (or a crash) sees whole records.
    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut bytes = Vec::with_capacity(data.len() + 16);
        bytes.extend_from_slice(&len);
        bytes.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        bytes.extend_from_slice(data);
        bytes.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.out
            .write_all(&bytes)
            .and_then(|()| self.out.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// A protobuf message being serialized, fields appended in order.
#[derive(Default)]
struct Message(Vec<u8>);

impl Message {
    fn key(&mut self, field: u32, wire_type: u8) {
        self.raw_varint((u64::from(field) << 3) | u64::from(wire_type));
    }

    fn raw_varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn varint(&mut self, field: u32, v: u64) {
        self.key(field, 0);
        self.raw_varint(v);
    }

    fn double(&mut self, field: u32, v: f64) {
        self.key(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn float(&mut self, field: u32, v: f32) {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn bytes(&mut self, field: u32, v: &[u8]) {
        self.key(field, 2);
        self.raw_varint(v.len() as u64);
        self.0.extend_from_slice(v);
    }
}

/// CRC-32C (Castagnoli), masked as TFRecord requires: `((crc >> 15) | (crc << 17)) + 0xa282ead8`.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn crc32c(data: &[u8]) -> u32 {
    const POLY: u32 = 0x82F6_3B78; // reflected Castagnoli polynomial
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C (RFC 3720 §B.4 lists it for "123456789").
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn varints_and_keys_follow_the_protobuf_encoding() {
        let mut m = Message::default();
        m.varint(2, 300);
        assert_eq!(m.0, [0x10, 0xAC, 0x02]);
    }
}
