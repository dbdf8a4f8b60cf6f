//! What a failing test or benchmark shows of a process's log: its end.

use std::path::Path;

/// The last `bytes` (or fewer, to a character's start) of the file at `path`, after its path:
/// `"<path>:\n<text>"`. A file that cannot be read shows as empty.
pub fn tail(path: &Path, bytes: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.floor_char_boundary(text.len().saturating_sub(bytes));
    format!("{}:\n{}", path.display(), &text[start..])
}
