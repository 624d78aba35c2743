//! ars-comp-1 over real sockets: input handling, errors, and the whole baseline chain.

mod chain;
mod input;
