//! Small files beside the database, each holding one number: the data dir's format and
//! the group's recorded feature level. They are read before the database is opened, so
//! a binary that refuses what they say changes nothing, and each is replaced whole (written
//! beside, synced, renamed, the directory synced): a crash leaves the old or the new.

use std::io::{Read, Write};
use std::path::Path;

use crate::error::RaftBackendError;

/// The data dir's format (`DATA_DIR_FORMAT`).
pub(crate) const FORMAT_FILE: &str = "ha-format";
/// The group's feature level, once recorded (see `data::level`).
pub(crate) const LEVEL_FILE: &str = "ha-group-level";
/// Where a record is written before it is renamed into place.
const NEW_SUFFIX: &str = ".new";
/// Longest record read (a number and a newline).
const MAX_RECORD: u64 = 64;

/// Whether `name` is one of these records (or one being written).
pub(crate) fn is_record(name: &str) -> bool {
    [FORMAT_FILE, LEVEL_FILE]
        .iter()
        .any(|record| name == *record || name.strip_suffix(NEW_SUFFIX) == Some(record))
}

/// An I/O failure on `path`, as a storage error naming it.
pub(crate) fn storage_error(path: &Path, e: &std::io::Error) -> RaftBackendError {
    RaftBackendError::Storage(format!("{}: {e}", path.display()))
}

/// The number in `dir/name`; `None` if there is no such file.
pub(crate) fn read(dir: &Path, name: &str) -> Result<Option<u32>, RaftBackendError> {
    let path = dir.join(name);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(storage_error(&path, &e)),
    };
    let mut text = String::new();
    file.take(MAX_RECORD)
        .read_to_string(&mut text)
        .map_err(|e| RaftBackendError::Corrupt(format!("{}: {e}", path.display())))?;
    text.trim().parse().map(Some).map_err(|_| {
        RaftBackendError::Corrupt(format!("{}: not a number: {text:?}", path.display()))
    })
}

/// Replaces `dir/name` with `value`, crash-safely.
pub(crate) fn write(dir: &Path, name: &str, value: u32) -> Result<(), RaftBackendError> {
    let storage = |e: std::io::Error| storage_error(dir, &e);
    let new = dir.join(format!("{name}{NEW_SUFFIX}"));
    let mut file = std::fs::File::create(&new).map_err(storage)?;
    file.write_all(format!("{value}\n").as_bytes())
        .map_err(storage)?;
    file.sync_all().map_err(storage)?;
    std::fs::rename(&new, dir.join(name)).map_err(storage)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(storage)
}

/// The group's feature level recorded in `dir` (0: none).
pub(crate) fn group_level(dir: &Path) -> Result<u32, RaftBackendError> {
    Ok(read(dir, LEVEL_FILE)?.unwrap_or(0))
}

/// Records the group's feature level in `dir` if it is higher than the one there.
pub(crate) fn raise_group_level(dir: &Path, level: u32) -> Result<(), RaftBackendError> {
    if level > group_level(dir)? {
        write(dir, LEVEL_FILE, level)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_replaced_whole_and_a_level_never_goes_back() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(group_level(dir.path()).ok(), Some(0));
        raise_group_level(dir.path(), 3).unwrap_or_else(|e| panic!("{e}"));
        raise_group_level(dir.path(), 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(group_level(dir.path()).ok(), Some(3));
        assert!(!dir.path().join("ha-group-level.new").exists());
        assert!(is_record("ha-group-level") && is_record("ha-format.new"));
        assert!(!is_record("ha-formats") && !is_record("db"));
        std::fs::write(dir.path().join(LEVEL_FILE), "three").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            group_level(dir.path()),
            Err(RaftBackendError::Corrupt(_))
        ));
    }
}
