//! Quantizers for BitNet-style training in candle.
