//! The data directory holds every payload, output and log line and the
//! token hashes: it is for the server's user alone. [`secure`] creates it
//! mode 0700, or tightens one that exists, and takes the group and other
//! permissions off everything already beneath it. Files the store creates
//! later inherit the process umask, which `muster serve` sets to 0077.

use std::io;
use std::path::Path;

/// Creates `dir` (0700) if needed and leaves nothing in it readable,
/// writable or searchable by anyone but its owner.
pub(crate) fn secure(dir: &Path) -> io::Result<()> {
    let context =
        |e: io::Error| io::Error::new(e.kind(), format!("securing the data directory {}: {e}", dir.display()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(context)?;
        // The directory itself may be a symbolic link; what is beneath it
        // is tightened without following links.
        let metadata = std::fs::metadata(dir).map_err(context)?;
        owner_only(dir, &metadata).map_err(context)?;
        for entry in std::fs::read_dir(dir).map_err(context)? {
            tighten(&entry.map_err(context)?.path()).map_err(context)?;
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir).map_err(context)?;
    Ok(())
}

/// Takes the group and other bits off `path` and, for a directory,
/// everything beneath it. Symbolic links are left alone.
#[cfg(unix)]
fn tighten(path: &Path) -> io::Result<()> {
    let metadata = std::fs::symlink_metadata(path)?;
    if metadata.file_type().is_symlink() {
        return Ok(());
    }
    owner_only(path, &metadata)?;
    if metadata.is_dir() {
        for entry in std::fs::read_dir(path)? {
            tighten(&entry?.path())?;
        }
    }
    Ok(())
}

#[cfg(unix)]
fn owner_only(path: &Path, metadata: &std::fs::Metadata) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !0o077))?;
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(u32::MAX)
    }

    #[test]
    fn an_open_directory_and_everything_in_it_become_owner_only() -> io::Result<()> {
        let root = tempfile::tempdir()?;
        let dir = root.path().join("data");
        std::fs::create_dir_all(dir.join("blobs"))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(dir.join("db"), b"payloads")?;
        std::fs::set_permissions(dir.join("db"), std::fs::Permissions::from_mode(0o644))?;
        std::fs::write(dir.join("blobs").join("1"), b"blob")?;
        std::fs::set_permissions(dir.join("blobs").join("1"), std::fs::Permissions::from_mode(0o666))?;
        let outside = root.path().join("outside");
        std::fs::write(&outside, b"not ours")?;
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644))?;
        std::os::unix::fs::symlink(&outside, dir.join("link"))?;

        secure(&dir)?;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("db")), 0o600);
        assert_eq!(mode(&dir.join("blobs")), 0o700);
        assert_eq!(mode(&dir.join("blobs").join("1")), 0o600);
        assert_eq!(mode(&outside), 0o644, "a link is not followed out of the directory");

        let fresh = root.path().join("a").join("fresh");
        secure(&fresh)?;
        assert_eq!(mode(&fresh), 0o700);
        Ok(())
    }
}
