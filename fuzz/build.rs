// The model_requests target links libtorch through model-service: give every target its
// rpath, as the workspace's own binaries get it.
fn main() {
    build_support::link_libtorch_rpath();
}
