#![no_std]
// The library target exists so lb-control can name this crate as a build dependency and be
// rebuilt when it changes; the program itself is the `lb-ebpf` binary (src/main.rs).
