//! The backend set: every service and backend with its admin and health state. One path
//! applies every change (API, health, config reload): store, Maglev, kernel, gateway view.

pub mod model;

pub use model::*;
