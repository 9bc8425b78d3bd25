// Shared by the build scripts of the crates that produce binaries (client, tests): embeds an rpath to the
// libtorch that torch-sys linked against, so the binaries run without LD_LIBRARY_PATH. torch-sys exports the
// directory as DEP_TCH_LIBTORCH_LIB to crates that depend on it directly.
//
// With FERROTUNE_CUDA=1 at build time, libtorch_cuda is linked with --no-as-needed: otherwise the linker drops
// it as unused and `tch::Cuda::is_available()` is false even on a GPU host.

#[allow(dead_code)]
fn rpath() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=FERROTUNE_CUDA");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if std::env::var("FERROTUNE_CUDA").as_deref() == Ok("1") {
            println!("cargo:rustc-link-arg=-L{lib}");
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
    }
}
