//! What a model does with a message: the tasks.

pub mod embedding;
