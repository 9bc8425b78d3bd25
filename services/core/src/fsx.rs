//! Every file ferrotune opens, lists or writes goes through this module.
//!
//! A serving process calls [`confine`] once with its artifact root (and the model registry, read-only). From
//! then on every path must lie under one of those directories and is opened relative to it with
//! `openat2(RESOLVE_BENEATH)`: a symlink anywhere on the way — in the path a request named or inside a
//! directory it named — cannot lead outside, for reads and writes, files and directories alike. Where the
//! kernel lacks `openat2`, the parent of a created file is opened that way by a component-wise fallback and
//! every opened file's real path (`/proc/self/fd`) is checked against the root after the open. Without
//! confinement (the CLI and its embedded services: the user's own files in the user's own process) paths
//! are opened as given. In both modes a read refuses anything that is not a regular file: a FIFO named as a
//! weights file would otherwise block the loader forever.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

struct Root {
    dir: PathBuf,
    fd: OwnedFd,
    writable: bool,
}

static ROOTS: OnceLock<Vec<Root>> = OnceLock::new();
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Confines every later file operation of this process to `root` (read and write) and `read_only` (read).
/// Directories that do not exist are skipped. Can be called once per process.
pub fn confine(root: &Path, read_only: &[&Path]) -> io::Result<()> {
    let mut roots = Vec::new();
    let dirs = std::iter::once((root, true)).chain(read_only.iter().map(|p| (*p, false)));
    for (dir, writable) in dirs {
        let Ok(dir) = dir.canonicalize() else {
            if writable {
                return Err(io::Error::new(io::ErrorKind::NotFound, format!("{}: no such directory", dir.display())));
            }
            continue;
        };
        let fd = File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        roots.push(Root { dir, fd: fd.into(), writable });
    }
    // For tests of the fallback on kernels that have openat2.
    if std::env::var_os("FERROTUNE_FSX_NO_OPENAT2").is_some() {
        NO_OPENAT2.store(true, Ordering::Relaxed);
    }
    ROOTS.set(roots).map_err(|_| io::Error::other("file confinement is already set"))
}

/// Whether [`confine`] has been called in this process.
pub fn is_confined() -> bool {
    ROOTS.get().is_some()
}

fn denied(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg.to_string())
}

/// The root `path` lies under and the path relative to it; `None` when this process is not confined.
fn beneath(path: &Path, write: bool) -> io::Result<Option<(&'static Root, PathBuf)>> {
    let Some(roots) = ROOTS.get() else { return Ok(None) };
    let abs = std::path::absolute(path)?;
    for r in roots {
        if let Ok(rel) = abs.strip_prefix(&r.dir) {
            if write && !r.writable {
                return Err(denied("is read-only for this service"));
            }
            let rel = if rel.as_os_str().is_empty() { PathBuf::from(".") } else { rel.to_path_buf() };
            return Ok(Some((r, rel)));
        }
    }
    Err(denied("is outside the artifact root"))
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_BENEATH: u64 = 0x08;

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

fn owned(r: i64) -> io::Result<OwnedFd> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EXDEV) | Some(libc::ELOOP) => denied("leads outside the artifact root (through a symlink)"),
            _ => e,
        });
    }
    // SAFETY: a non-negative return of open/openat2 is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// The directory an opened descriptor really is (or the file), as the kernel resolved it.
fn real_path(fd: &OwnedFd) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Opens `rel` beneath `root` with `flags`: `openat2(RESOLVE_BENEATH)`, or the fallback described above.
fn open_beneath(root: &Root, rel: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let flags = flags | libc::O_CLOEXEC;
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        let c = cstr(rel)?;
        let how = OpenHow { flags: flags as u64, mode: mode as u64, resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS };
        // SAFETY: valid C string and `open_how` of the size passed; the kernel only reads them.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.fd.as_raw_fd(),
                c.as_ptr(),
                &how as *const OpenHow,
                size_of::<OpenHow>(),
            )
        };
        // ENOSYS: a kernel before 5.6; EPERM: a seccomp profile that does not know openat2 (older container
        // runtimes). Either way every later open takes the fallback, which checks what it opened.
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::ENOSYS | libc::EPERM) if r < 0 => NO_OPENAT2.store(true, Ordering::Relaxed),
            _ => return owned(r),
        }
    }
    // Fallback: a created file's final component is never followed (O_NOFOLLOW) under a verified parent;
    // whatever was opened is checked by its real path.
    let fd = if flags & libc::O_CREAT != 0 {
        let (parent, name) = split(rel)?;
        let p = open_beneath(root, &parent, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let c = cstr(Path::new(&name))?;
        // SAFETY: valid descriptor and C string.
        owned(unsafe { libc::openat(p.as_raw_fd(), c.as_ptr(), flags | libc::O_NOFOLLOW, mode) } as i64)?
    } else {
        let c = cstr(rel)?;
        // SAFETY: valid descriptor and C string.
        owned(unsafe { libc::openat(root.fd.as_raw_fd(), c.as_ptr(), flags) } as i64)?
    };
    if !real_path(&fd)?.starts_with(&root.dir) {
        return Err(denied("leads outside the artifact root (through a symlink)"));
    }
    Ok(fd)
}

fn split(rel: &Path) -> io::Result<(PathBuf, OsString)> {
    let name = rel.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let parent = rel.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok((parent.to_path_buf(), name.to_os_string()))
}

fn not_regular(meta: &std::fs::Metadata) -> Option<io::Error> {
    (!meta.is_file()).then(|| {
        let what = if meta.is_dir() { "a directory" } else { "not a regular file" };
        io::Error::new(io::ErrorKind::InvalidInput, format!("is {what}"))
    })
}

/// Opens a regular file for reading.
pub fn open(path: impl AsRef<Path>) -> io::Result<File> {
    let path = path.as_ref();
    let file = match beneath(path, false)? {
        Some((root, rel)) => File::from(open_beneath(root, &rel, libc::O_RDONLY | libc::O_NONBLOCK, 0)?),
        None => File::options().read(true).custom_flags(libc::O_NONBLOCK).open(path)?,
    };
    match not_regular(&file.metadata()?) {
        Some(e) => Err(e),
        None => Ok(file),
    }
}

/// The whole content of a regular file.
pub fn read(path: impl AsRef<Path>) -> io::Result<Vec<u8>> {
    let path = path.as_ref();
    let mut f = open(path)?;
    let mut buf = Vec::with_capacity(f.metadata().map(|m| m.len() as usize).unwrap_or(0));
    f.read_to_end(&mut buf)?;
    Ok(buf)
}

/// The whole content of a regular file as UTF-8 text.
pub fn read_to_string(path: impl AsRef<Path>) -> io::Result<String> {
    let path = path.as_ref();
    String::from_utf8(read(path)?).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
        io::Error::new(io::ErrorKind::InvalidData, format!("line {line}: not UTF-8 text (byte {at})"))
    })
}

fn open_write(path: &Path, flags: i32) -> io::Result<File> {
    match beneath(path, true)? {
        Some((root, rel)) => Ok(File::from(open_beneath(root, &rel, libc::O_WRONLY | libc::O_CREAT | flags, 0o644)?)),
        None => {
            let mut o = File::options();
            o.write(true).create(true);
            if flags & libc::O_APPEND != 0 {
                o.append(true);
            } else {
                o.truncate(true);
            }
            o.open(path)
        }
    }
}

/// Creates (or truncates) a file for writing.
pub fn create(path: impl AsRef<Path>) -> io::Result<File> {
    let path = path.as_ref();
    open_write(path, libc::O_TRUNC)
}

/// Opens a file for appending, creating it if missing.
pub fn append(path: impl AsRef<Path>) -> io::Result<File> {
    let path = path.as_ref();
    open_write(path, libc::O_APPEND)
}

/// Writes `bytes` as the whole content of `path`.
pub fn write(path: impl AsRef<Path>, bytes: impl AsRef<[u8]>) -> io::Result<()> {
    let path = path.as_ref();
    create(path)?.write_all(bytes.as_ref())
}

/// Copies a regular file's content to `to`.
pub fn copy(from: impl AsRef<Path>, to: impl AsRef<Path>) -> io::Result<u64> {
    let from = from.as_ref();
    let to = to.as_ref();
    io::copy(&mut open(from)?, &mut create(to)?)
}

/// Creates a directory and its missing parents.
pub fn create_dir_all(path: impl AsRef<Path>) -> io::Result<()> {
    let path = path.as_ref();
    let Some((root, rel)) = beneath(path, true)? else { return std::fs::create_dir_all(path) };
    let mut sofar = PathBuf::new();
    for c in rel.components() {
        sofar.push(c);
        match open_beneath(root, &sofar, libc::O_PATH | libc::O_DIRECTORY, 0) {
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let (parent, name) = split(&sofar)?;
        let p = open_beneath(root, &parent, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let c = cstr(Path::new(&name))?;
        // SAFETY: valid descriptor and C string. mkdirat never follows a symlink at the final component.
        if unsafe { libc::mkdirat(p.as_raw_fd(), c.as_ptr(), 0o755) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(e);
            }
            // A name that exists but did not open as a directory beneath the root: a file or a symlink out.
            open_beneath(root, &sofar, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        }
    }
    Ok(())
}

/// What a path is, symlinks followed (beneath the root when confined).
pub fn metadata(path: impl AsRef<Path>) -> io::Result<std::fs::Metadata> {
    let path = path.as_ref();
    match beneath(path, false)? {
        Some((root, rel)) => File::from(open_beneath(root, &rel, libc::O_PATH, 0)?).metadata(),
        None => std::fs::metadata(path),
    }
}

/// Whether `path` is a regular file this process may read.
pub fn is_file(path: impl AsRef<Path>) -> bool {
    let path = path.as_ref();
    metadata(path).is_ok_and(|m| m.is_file())
}

/// Whether `path` is a directory this process may read.
pub fn is_dir(path: impl AsRef<Path>) -> bool {
    let path = path.as_ref();
    metadata(path).is_ok_and(|m| m.is_dir())
}

/// Whether `path` exists for this process (when confined: beneath the root).
pub fn exists(path: impl AsRef<Path>) -> bool {
    let path = path.as_ref();
    metadata(path).is_ok()
}

/// One entry of [`read_dir`].
#[derive(Debug, Clone)]
pub struct Entry {
    /// The entry's name.
    pub name: OsString,
    /// `dir` joined with the name.
    pub path: PathBuf,
    /// Whether it is a directory (symlinks followed; a symlink out of a confined root is left out).
    pub is_dir: bool,
}

/// The entries of a directory, sorted by name. When confined, a symlink that leads outside the root (or
/// nowhere) is left out.
pub fn read_dir(dir: impl AsRef<Path>) -> io::Result<Vec<Entry>> {
    let dir = dir.as_ref();
    let (listing, confined) = match beneath(dir, false)? {
        Some((root, rel)) => {
            let fd = open_beneath(root, &rel, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            (std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd()))?.collect::<Vec<_>>(), true)
        }
        None => (std::fs::read_dir(dir)?.collect(), false),
    };
    let mut out = Vec::new();
    for e in listing {
        let e = e?;
        let path = dir.join(e.file_name());
        let ty = e.file_type()?;
        let is_dir = if ty.is_symlink() {
            match metadata(&path) {
                Ok(m) => m.is_dir(),
                Err(_) if confined => continue,
                Err(_) => false,
            }
        } else {
            ty.is_dir()
        };
        out.push(Entry { name: e.file_name(), path, is_dir });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Renames `from` to `to` (same file system). Neither final component is followed.
pub fn rename(from: impl AsRef<Path>, to: impl AsRef<Path>) -> io::Result<()> {
    let from = from.as_ref();
    let to = to.as_ref();
    let (Some((ra, a)), Some((rb, b))) = (beneath(from, true)?, beneath(to, true)?) else {
        return std::fs::rename(from, to);
    };
    let (pa, na) = split(&a)?;
    let (pb, nb) = split(&b)?;
    let fa = open_beneath(ra, &pa, libc::O_PATH | libc::O_DIRECTORY, 0)?;
    let fb = open_beneath(rb, &pb, libc::O_PATH | libc::O_DIRECTORY, 0)?;
    let (ca, cb) = (cstr(Path::new(&na))?, cstr(Path::new(&nb))?);
    // SAFETY: valid descriptors and C strings.
    if unsafe { libc::renameat(fa.as_raw_fd(), ca.as_ptr(), fb.as_raw_fd(), cb.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where `path`'s final component can be removed from: its parent opened beneath the root.
fn parent_of(path: &Path) -> io::Result<Option<(OwnedFd, OsString)>> {
    let Some((root, rel)) = beneath(path, true)? else { return Ok(None) };
    let (parent, name) = split(&rel)?;
    Ok(Some((open_beneath(root, &parent, libc::O_PATH | libc::O_DIRECTORY, 0)?, name)))
}

/// Removes a file (a symlink itself, never its target).
pub fn remove_file(path: impl AsRef<Path>) -> io::Result<()> {
    let path = path.as_ref();
    let Some((p, name)) = parent_of(path)? else { return std::fs::remove_file(path) };
    let c = cstr(Path::new(&name))?;
    // SAFETY: valid descriptor and C string.
    if unsafe { libc::unlinkat(p.as_raw_fd(), c.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes a directory tree (symlinks inside it are removed, never followed).
pub fn remove_dir_all(path: impl AsRef<Path>) -> io::Result<()> {
    let path = path.as_ref();
    match parent_of(path)? {
        // The verified parent through its descriptor: nothing on the way to it can be swapped for a symlink.
        Some((p, name)) => std::fs::remove_dir_all(Path::new(&format!("/proc/self/fd/{}", p.as_raw_fd())).join(name)),
        None => std::fs::remove_dir_all(path),
    }
}

/// Checks that `path` may be read and returns it, for libraries that open files by path themselves
/// (libtorch's tensor loading). The check and their open are two steps.
pub fn checked(path: &Path) -> io::Result<&Path> {
    if let Some((root, rel)) = beneath(path, false)? {
        open_beneath(root, &rel, libc::O_PATH, 0)?;
    }
    Ok(path)
}

/// Like [`checked`] for a file a library will create (plotters' SVG, libtorch's saves): its parent must be
/// beneath a writable root and the file itself must not be a symlink.
pub fn checked_for_write(path: &Path) -> io::Result<&Path> {
    if let Some((p, name)) = parent_of(path)? {
        let c = cstr(Path::new(&name))?;
        // SAFETY: valid descriptor and C string; `st` is written by the kernel.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::fstatat(p.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
        if r == 0 && st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(denied("is a symlink"));
        }
    }
    Ok(path)
}

/// A read-only memory map of a regular file.
pub fn mmap(path: impl AsRef<Path>) -> io::Result<memmap2::Mmap> {
    let path = path.as_ref();
    let file = open(path)?;
    // SAFETY: the map is read-only; ferrotune never writes a file it has mapped (writes go to a temporary
    // file renamed into place), so the mapped bytes do not change under us.
    unsafe { memmap2::Mmap::map(&file) }
}
