// model-service links libtorch (tch): the test binaries need its rpath like the service's own.
fn main() {
    build_support::link_libtorch_rpath();
}
