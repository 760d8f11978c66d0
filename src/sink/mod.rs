//! Where results go: ClickHouse rows, and Kafka topics for dead letters and escalations.

pub mod clickhouse;
pub mod kafka;
