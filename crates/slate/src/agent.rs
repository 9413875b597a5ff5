//! slate-agent: PID 1 inside the vm provider's machines (see slate_vm::agent).

fn main() {
    slate_vm::agent::main()
}
