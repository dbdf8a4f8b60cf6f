//! (lab: under construction)
