//! The `fleetmq` binary: one node of the broker. All of it lives in `fleetmq-node`.

fn main() -> anyhow::Result<()> {
    fleetmq_node::main_entry()
}
