//! DataService: dataset formatting, preview, statistics and tokenizing over gRPC. The formatting itself is
//! a library in the model core (`ferrotune_core::data`), which the training runners also use in-process.

pub mod service;
