//! File confinement (`ferrotune_core::fsx::confine`), as a serving process has it: a test binary of its own,
//! because confinement is process-wide. The probes of the hardening issue: symlinks placed inside a directory
//! under the root, pointing outside, must not be read, written, created through or listed.

use std::io::ErrorKind;
use std::os::unix::fs::symlink;
use std::path::Path;

use ferrotune_core::fsx;

fn denied<T: std::fmt::Debug>(r: std::io::Result<T>, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{what}: {e}");
}

/// The same probes once more in a child process that uses the fallback for kernels without `openat2`
/// (component-wise parent opens, `O_NOFOLLOW`, and a check of every opened descriptor's real path).
#[test]
fn the_fallback_without_openat2_confines_as_well() {
    if std::env::var_os("FERROTUNE_FSX_NO_OPENAT2").is_some() {
        return; // this is the child
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "symlinks_inside_the_root_cannot_lead_outside", "--test-threads", "1"])
        .env("FERROTUNE_FSX_NO_OPENAT2", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("1 passed"), "{text}{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn symlinks_inside_the_root_cannot_lead_outside() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let outside = t.path().join("outside");
    let models = t.path().join("models");
    for d in [&root, &outside, &models] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(outside.join("secret.json"), "{\"secret\": 1}").unwrap();
    std::fs::write(outside.join("victim.yaml"), "keep me").unwrap();
    std::fs::write(models.join("config.json"), "{}").unwrap();
    // An innocent-looking run directory under the root, planted with symlinks out.
    let run = root.join("run");
    std::fs::create_dir_all(run.join("real")).unwrap();
    symlink(outside.join("victim.yaml"), run.join("recipe.yaml")).unwrap();
    symlink(outside.join("new.jinja"), run.join("chat_template.jinja")).unwrap(); // dangling, outside
    symlink(outside.join("secret.json"), run.join("stats.json")).unwrap();
    symlink(&outside, run.join("sub")).unwrap();
    symlink("real", run.join("inside")).unwrap(); // a symlink that stays inside is fine
    std::fs::write(run.join("real/ok.txt"), "ok").unwrap();
    let root = root.canonicalize().unwrap();
    let run = root.join("run");
    fsx::confine(&root, &[&models]).unwrap();
    assert!(fsx::is_confined());

    // Writes through a symlink (existing or dangling target outside) are refused; the outside is untouched.
    denied(fsx::write(run.join("recipe.yaml"), "pwned"), "overwrite through a symlink");
    denied(fsx::write(run.join("chat_template.jinja"), "x"), "create through a dangling symlink");
    denied(fsx::write(run.join("sub/planted.txt"), "x"), "create inside a symlinked directory");
    denied(fsx::create_dir_all(run.join("sub/deeper")), "mkdir inside a symlinked directory");
    assert_eq!(std::fs::read_to_string(outside.join("victim.yaml")).unwrap(), "keep me");
    assert!(!outside.join("new.jinja").exists() && !outside.join("planted.txt").exists());
    assert!(!outside.join("deeper").exists());

    // Reads, metadata and listings do not follow them either.
    denied(fsx::read_to_string(run.join("stats.json")), "read through a symlink");
    denied(fsx::read(run.join("sub/secret.json")), "read inside a symlinked directory");
    denied(fsx::mmap(run.join("stats.json")), "mmap through a symlink");
    assert!(!fsx::exists(run.join("stats.json")));
    let names: Vec<String> =
        fsx::read_dir(&run).unwrap().into_iter().map(|e| e.name.to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["inside", "real"], "symlinks out are left out of listings");
    denied(fsx::read_dir(run.join("sub")), "list a symlinked directory");

    // Paths outside every root; the read-only models directory.
    denied(fsx::read(outside.join("secret.json")), "absolute path outside");
    denied(fsx::read(root.join("../outside/secret.json")), "dot-dot out of the root");
    assert_eq!(fsx::read_to_string(models.join("config.json")).unwrap(), "{}");
    denied(fsx::write(models.join("config.json"), "x"), "write into the read-only models dir");

    // What stays inside works: symlinks beneath the root, creating, renaming, removing.
    assert_eq!(fsx::read_to_string(run.join("inside/ok.txt")).unwrap(), "ok");
    fsx::create_dir_all(run.join("a/b/c")).unwrap();
    fsx::write(run.join("a/b/c/f.txt"), "1").unwrap();
    fsx::rename(run.join("a/b/c/f.txt"), run.join("a/g.txt")).unwrap();
    assert_eq!(fsx::read_to_string(run.join("a/g.txt")).unwrap(), "1");
    fsx::remove_dir_all(run.join("a")).unwrap();
    assert!(!run.join("a").exists());
    // Removing a symlink removes the link, never what it points to.
    fsx::remove_file(run.join("stats.json")).unwrap();
    assert!(outside.join("secret.json").exists());
    fsx::remove_dir_all(run.join("sub")).ok();
    assert!(outside.join("secret.json").exists(), "remove_dir_all never descends a symlink");
    // A FIFO is not a file to read (it would block the loader forever).
    let fifo = run.join("weights.safetensors");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = fsx::read(&fifo).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(Path::new(&fifo).exists());
}
