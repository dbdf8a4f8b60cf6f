//! (sim-node: under construction)
