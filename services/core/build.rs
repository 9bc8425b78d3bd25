//! Embeds an rpath to libtorch in this crate's test binaries (see scripts/rpath_build.rs) and compiles the
//! C++ in csrc/ (autograd nodes, the c10d process group) against the same libtorch's headers (`<torch>/lib` → `<torch>/include`), with
//! the C++ ABI flag torch-sys uses (`LIBTORCH_CXX11_ABI`, default 1, as PyTorch's wheels are built).
include!("../../scripts/rpath_build.rs");

fn main() {
    rpath();
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB");
    let root = std::path::Path::new(&lib).parent().expect("libtorch's lib dir has a parent").to_path_buf();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        // c10d's ProcessGroupGloo (declarations only; see csrc/gloo/README.md).
        .include("csrc/gloo")
        .define("USE_C10D_GLOO", None)
        .file("csrc/frozen_linear.cpp")
        .file("csrc/dropout.cpp")
        .file("csrc/process_group.cpp")
        .file("csrc/grad_sync.cpp")
        .compile("ferrotune_csrc");
}
