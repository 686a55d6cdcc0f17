//! The `fleetmq` binary: one node of the broker. All of it lives in `fleetmq-node`.

// glibc malloc was a fifth of the broker's CPU under persistent QoS 1 load (many small,
// short-lived buffers across threads); jemalloc's thread caches cut that, and unlike
// mimalloc it did not raise the memory an idle connection costs.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    fleetmq_node::main_entry()
}
