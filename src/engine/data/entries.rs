//! What an entry of the data folder is, without following it blindly: regular
//! files are read; links are followed only to regular files inside the data
//! folder; folders reached through a link are never descended into (no cycles,
//! no escape); FIFOs, sockets, devices and folders that carry a data file's name
//! are listed so that they are skipped with a reason instead of silently (a FIFO
//! would block the reader for ever).

use std::fs::FileType;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use super::FileError;

/// How the lister treats one directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Listing {
    /// A real folder (not a link): descend into it (image-folder).
    Descend,
    /// A candidate data file: listed, then checked by [`refuse_unreadable`].
    Candidate,
}

/// How an entry of type `ft` (its own type: links not followed) is listed.
pub(super) fn listing(ft: FileType) -> Listing {
    if ft.is_dir() {
        Listing::Descend
    } else {
        Listing::Candidate
    }
}

fn kind_name(ft: FileType) -> &'static str {
    if ft.is_dir() {
        "a folder"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// Refuses, before anything is opened, an entry that is not a regular file, a
/// link that leads out of `data_dir`, or a link to a folder (never followed).
pub(super) fn refuse_unreadable(path: &Path, data_dir: &Path) -> Result<(), FileError> {
    let meta = std::fs::symlink_metadata(path).map_err(FileError::Io)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = path.canonicalize().map_err(FileError::ResolveLink)?;
        let dir = data_dir.canonicalize().map_err(FileError::ResolveDataDir)?;
        if !target.starts_with(&dir) {
            return Err(FileError::LinkOutside { target });
        }
        let to = std::fs::metadata(path).map_err(FileError::Io)?;
        if !to.file_type().is_file() {
            return Err(FileError::LinkNotRegular {
                target,
                kind: kind_name(to.file_type()),
            });
        }
        return Ok(());
    }
    if !ft.is_file() {
        return Err(FileError::NotRegular {
            kind: kind_name(ft),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_folders_and_folder_links_get_reasons() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        let fifo = dir.join("a.csv");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = refuse_unreadable(&fifo, dir).unwrap_err();
        assert!(matches!(e, FileError::NotRegular { kind: "a FIFO" }), "{e}");
        assert_eq!(e.to_string(), "a FIFO, not a regular file: not read");
        std::fs::create_dir(dir.join("b.csv")).unwrap();
        let e = refuse_unreadable(&dir.join("b.csv"), dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("folder"), "{e}");
        std::os::unix::fs::symlink(dir.join("b.csv"), dir.join("c.csv")).unwrap();
        let e = refuse_unreadable(&dir.join("c.csv"), dir).unwrap_err();
        assert!(matches!(e, FileError::LinkNotRegular { .. }), "{e}");
        let e = e.to_string();
        assert!(
            e.contains("links are followed to regular files only"),
            "{e}"
        );
        std::fs::write(dir.join("d.csv"), "a,label\n1,0\n").unwrap();
        assert!(refuse_unreadable(&dir.join("d.csv"), dir).is_ok());
        std::os::unix::fs::symlink(dir.join("d.csv"), dir.join("e.csv")).unwrap();
        assert!(refuse_unreadable(&dir.join("e.csv"), dir).is_ok());
    }
}
