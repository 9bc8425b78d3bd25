//! Embeds an rpath to libtorch in this crate's test binaries; see scripts/rpath_build.rs.
include!("../../scripts/rpath_build.rs");

fn main() {
    rpath();
}
