//! Loaders for the small real data sets the examples train on (copies live in `data/`).

pub mod mnist;
pub mod shakespeare;
