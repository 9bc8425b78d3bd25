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
    nccl_shim(&root, &abi);
}

/// Builds `csrc/nccl_group.cpp` into `$OUT_DIR/libferrotune_nccl.so` (linked against libtorch_cuda; embedded in
/// the binary and loaded only when a job asks for NCCL). Needs the CUDA runtime and NCCL headers that the torch
/// wheel's `nvidia-*` dependencies install beside it; without them (a CPU-only libtorch) the file is left empty
/// and asking for NCCL is an error that says so.
fn nccl_shim(torch: &std::path::Path, abi: &str) {
    println!("cargo:rerun-if-env-changed=FERROTUNE_NO_NCCL");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("libferrotune_nccl.so");
    let empty = || std::fs::write(&out, b"").expect("writing the empty NCCL shim");
    let site = torch.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
    let nvidia: Vec<std::path::PathBuf> = std::fs::read_dir(site.join("nvidia"))
        .map(|d| d.flatten().map(|e| e.path().join("include")).collect())
        .unwrap_or_default();
    let with = |f: &str, dirs: &[std::path::PathBuf]| dirs.iter().find(|i| i.join(f).is_file()).cloned();
    // The runtime headers' `crt/` subdirectory ships with nvcc, which the wheel does not pull in; triton's copy
    // of the CUDA headers (a torch dependency) has it.
    let crt_dirs = [nvidia.clone(), vec![site.join("triton/backends/nvidia/include")]].concat();
    let includes = (|| {
        Some((with("cuda_runtime_api.h", &nvidia)?, with("nccl.h", &nvidia)?, with("crt/host_config.h", &crt_dirs)?))
    })();
    let lib = torch.join("lib");
    let (Some((cuda, nccl, crt)), true, false) =
        (includes, lib.join("libtorch_cuda.so").is_file(), std::env::var("FERROTUNE_NO_NCCL").is_ok_and(|v| v == "1"))
    else {
        println!("cargo:warning=no CUDA/NCCL headers beside libtorch: this build cannot use NCCL");
        return empty();
    };
    let compiler = cc::Build::new().cpp(true).get_compiler();
    let mut cmd = compiler.to_command();
    cmd.args(["-shared", "-fPIC", "-O2", "-std=c++17", "-w"])
        .arg(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .args(["-DUSE_C10D_NCCL", "-DGLOG_USE_GLOG_EXPORT"])
        .arg("-I")
        .arg(torch.join("include"))
        .arg("-I")
        .arg(torch.join("include/torch/csrc/api/include"))
        .arg("-I")
        .arg(&cuda)
        .arg("-I")
        .arg(&nccl)
        .arg("-idirafter")
        .arg(&crt)
        .arg("csrc/nccl_group.cpp")
        .arg("-L")
        .arg(&lib)
        .args(["-ltorch_cuda", "-lc10_cuda", "-ltorch_cpu", "-lc10"])
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-o")
        .arg(&out);
    let status = cmd.status().expect("running the C++ compiler for the NCCL shim");
    assert!(status.success(), "building the NCCL shim failed ({status})");
}
