//! Embeds an rpath to libtorch in this crate's binaries; see scripts/rpath_build.rs.
include!("../scripts/rpath_build.rs");

fn main() {
    rpath();
}
