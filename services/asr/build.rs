fn main() {
    build_support::link_libtorch_rpath();
}
